"""Train the reference model's byte-level BPE tokenizer (``tokenizers``) on the corpus's training split.

Digits are split one per token so that a passkey is copied digit by digit.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 8192
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` tokens (specials included) trained on ``texts``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def main(corpus: Path, out: Path) -> None:
    from .corpus import read

    train(doc["text"] for doc in read(corpus / "train.jsonl.xz")).save_pretrained(out)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m longreach.reference_model.tokenizer CORPUS_DIR OUT_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
