"""``python -m longreach`` runs the command line, as ``torchrun -m longreach finetune ...`` needs."""

from .cli import main

main(prog_name="longreach")
