"""Retrieval prompts built in token space: a needle hidden at a depth inside a haystack, asked for at the end.

Prompts are assembled from separately encoded segments, so a prompt has exactly the requested
number of tokens and the answer's tokens are known. The reference model's synthetic training data
is built by the same functions (``longreach.reference_model.data``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"

NEEDLE_INTRO = "Read the text below and remember the special magic number it mentions."
NEEDLE_SENTENCE = " The special magic number of {name} is {key}."
NEEDLE_QUESTION = "\nWhat is the special magic number of {name}? The special magic number of {name} is"
NEEDLE_NAMES = ("Lisbon", "Nairobi", "Oslo", "Quito", "Hanoi", "Dakar", "Lima", "Perth", "Tunis", "Sofia",
                "Kyoto", "Bergen", "Cairo", "Porto", "Riga", "Accra")


@dataclass(frozen=True)
class Prompt:
    """``ids``: prompt tokens (exactly the requested length); ``key``: the digits the model must answer;
    ``answer``: the key's tokens as the prompt's continuation (used for training)."""

    ids: list[int]
    key: str
    answer: list[int]


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _start(tokenizer) -> list[int]:
    """The special tokens the tokenizer itself puts before a text (Llama's BOS; none for SmolLM2, whose
    BOS is its chat opener): a prompt begins as the model's tokenizer begins one."""
    plain = encode(tokenizer, "a")
    full = list(tokenizer.encode("a", add_special_tokens=True))
    for cut in range(len(full) - len(plain) + 1):
        if full[cut:cut + len(plain)] == plain:
            return full[:cut]
    return []


def fixed_size(tokenizer, intro: str, needle: str, question: str) -> int:
    """Tokens a prompt needs besides its haystack."""
    return len(_start(tokenizer)) + sum(len(encode(tokenizer, t)) for t in (intro, needle, question))


def assemble(tokenizer, length: int, depth: float, *, intro: str, haystack: list[int], needle: str,
             question: str, answer: str, unit: int = 1) -> Prompt:
    """A prompt of ``length`` tokens: intro, haystack with the needle after ``depth`` of it, question.

    ``haystack`` is repeated as needed; the needle goes on a multiple of ``unit`` haystack tokens
    (sentence boundaries of a repeated filler).
    """
    check_depth(depth)
    head, needle_ids, tail = _start(tokenizer) + encode(tokenizer, intro), encode(tokenizer, needle), \
        encode(tokenizer, question)
    room = length - len(head) - len(needle_ids) - len(tail)
    if room < 0:
        raise ValueError(f"length {length} is below the prompt's size: its fixed parts take "
                         f"{length - room} tokens with this tokenizer")
    if not haystack:
        raise ValueError("haystack must hold at least one token")
    filler = (haystack * (room // len(haystack) + 1))[:room]
    cut = min(room, round(depth * room / unit) * unit)
    ids = head + filler[:cut] + needle_ids + filler[cut:] + tail
    return Prompt(ids=ids, key=answer.strip(), answer=encode(tokenizer, answer))


def passkey(tokenizer, length: int, depth: float, rng: random.Random) -> Prompt:
    """A passkey prompt (Mohtashami & Jaggi 2023): a random 5-digit key inside repeated filler."""
    key = str(rng.randint(10000, 99999))
    filler = encode(tokenizer, PASSKEY_FILLER)
    return assemble(tokenizer, length, depth, intro=PASSKEY_INTRO, haystack=filler,
                    needle=PASSKEY_NEEDLE.format(key=key), question=PASSKEY_QUESTION, answer=f" {key}",
                    unit=len(filler))


def needle(tokenizer, length: int, depth: float, rng: random.Random, haystack: list[int]) -> Prompt:
    """A needle prompt: a named 7-digit number hidden inside real text (``haystack`` token ids)."""
    name, key = rng.choice(NEEDLE_NAMES), str(rng.randint(1_000_000, 9_999_999))
    return assemble(tokenizer, length, depth, intro=NEEDLE_INTRO, haystack=haystack,
                    needle=NEEDLE_SENTENCE.format(name=name, key=key), question=NEEDLE_QUESTION.format(name=name),
                    answer=f" {key}")


def check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
