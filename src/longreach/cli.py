"""The ``longreach`` command line."""

from __future__ import annotations

import time

import click
import torch

from . import attention_methods, extend, position_schemes, restore
from .models import tiny_model


@click.group()
def main() -> None:
    """longreach: long-context extension, sparse attention and evaluation for Hugging Face causal LMs."""


@main.command()
def methods() -> None:
    """List the attention methods and position schemes."""
    click.echo("attention methods:")
    for name, summary in attention_methods().items():
        click.echo(f"  {name:<13} {summary}")
    click.echo("position schemes:")
    for name, options in position_schemes().items():
        click.echo(f"  {name:<13} options: {', '.join(options)}")


@main.command()
@click.option("--length", default=1024, show_default=True, type=click.IntRange(2, 65536), help="tokens per forward")
@click.option("--seed", default=0, show_default=True, type=int)
def demo(length: int, seed: int) -> None:
    """Smoke demo on a tiny random Llama: every method's forward against dense, on this machine."""
    torch.manual_seed(seed)
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    with torch.no_grad():
        extend(model, attention="dense", position="yarn", factor=length / 256)
        reference = model(ids).logits
        click.echo(f"tiny random Llama, {length} tokens, yarn x{length / 256:g}; difference from dense logits")
        click.echo(f"{'method':<13} {'max |diff|':>11} {'seconds':>8}")
        for name in attention_methods():
            extend(model, attention=name, position="yarn", factor=length / 256)
            start = time.perf_counter()
            logits = model(ids).logits
            seconds = time.perf_counter() - start
            click.echo(f"{name:<13} {(logits - reference).abs().max().item():>11.4f} {seconds:>8.3f}")
    restore(model)
