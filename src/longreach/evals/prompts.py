"""Retrieval prompts built in token space: a needle hidden at a depth inside a haystack, asked for at the end.

Prompts are assembled from separately encoded segments, so a prompt has exactly the requested
number of tokens and the answer's tokens are known. The reference model's synthetic training data
is built by the same functions (``longreach.reference_model.data``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key?"
PASSKEY_LEAD = " The pass key is"

NEEDLE_INTRO = "Read the text below and remember the special magic number it mentions."
NEEDLE_SENTENCE = " The special magic number of {name} is {key}."
NEEDLE_QUESTION = "\nWhat is the special magic number of {name}?"
NEEDLE_LEAD = " The special magic number of {name} is"
DOCUMENT_SEPARATOR = "\n\n"
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


@lru_cache(maxsize=4)
def encode_documents(tokenizer, texts: tuple[str, ...]) -> tuple[list[int], ...]:
    """Each of ``texts`` encoded, kept for the next call with the same tokenizer and texts: a comparison
    evaluates many setups and lengths over the same 1.36M-token haystack (4 s to encode on 2 cores)."""
    return tuple(encode(tokenizer, text) for text in texts)


def _start(tokenizer) -> list[int]:
    """The special tokens the tokenizer itself puts before a text (Llama's BOS; none for SmolLM2, whose
    BOS is its chat opener): a prompt begins as the model's tokenizer begins one."""
    plain = encode(tokenizer, "a")
    full = list(tokenizer.encode("a", add_special_tokens=True))
    for cut in range(len(full) - len(plain) + 1):
        if full[cut:cut + len(plain)] == plain:
            return full[:cut]
    return []


def fixed_size(tokenizer, intro: str, needle: str, question: str, lead: str = "", chat: bool = False) -> int:
    """Tokens a prompt needs besides its haystack."""
    head, tail = _ends(tokenizer, intro, question, lead, chat)
    return len(head) + len(tail) + len(encode(tokenizer, needle))


CHAT_MARK = "\x00"


def chat_frame(tokenizer) -> tuple[str, str]:
    """The text an instruct model's chat template puts before and after one user message, up to the
    start of the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True needs a tokenizer with a chat template (an instruct model's)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_MARK}], tokenize=False,
                                         add_generation_prompt=True)
    before, _, after = text.partition(CHAT_MARK)
    return before, after


def _ends(tokenizer, intro: str, question: str, lead: str, chat: bool) -> tuple[list[int], list[int]]:
    """The tokens before the haystack and after the needle: as the tokenizer begins a text, or (``chat``)
    the question as the user's message and the answer's lead as the start of the assistant's reply."""
    if not chat:
        return _start(tokenizer) + encode(tokenizer, intro), encode(tokenizer, question + lead)
    before, after = chat_frame(tokenizer)
    head = encode(tokenizer, before) + encode(tokenizer, intro)
    return head, encode(tokenizer, question) + encode(tokenizer, after) + encode(tokenizer, lead.lstrip())


def assemble(tokenizer, length: int, depth: float, *, intro: str, haystack: list[int], needle: str,
             question: str, answer: str, unit: int = 1, lead: str = "", chat: bool = False) -> Prompt:
    """A prompt of ``length`` tokens: intro, haystack with the needle after ``depth`` of it, question and
    the answer's ``lead`` (with ``chat``, in the model's chat template: see :func:`_ends`).

    ``haystack`` is repeated as needed; the needle goes on a multiple of ``unit`` haystack tokens
    (sentence boundaries of a repeated filler).
    """
    check_depth(depth)
    (head, tail), needle_ids = _ends(tokenizer, intro, question, lead, chat), encode(tokenizer, needle)
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


def passkey(tokenizer, length: int, depth: float, rng: random.Random, chat: bool = False) -> Prompt:
    """A passkey prompt (Mohtashami & Jaggi 2023): a random 5-digit key inside repeated filler."""
    key = str(rng.randint(10000, 99999))
    filler = encode(tokenizer, PASSKEY_FILLER)
    return assemble(tokenizer, length, depth, intro=PASSKEY_INTRO, haystack=filler,
                    needle=PASSKEY_NEEDLE.format(key=key), question=PASSKEY_QUESTION, answer=f" {key}",
                    unit=len(filler), lead=PASSKEY_LEAD, chat=chat)


def needle(tokenizer, length: int, depth: float, rng: random.Random, haystack: list[int],
           chat: bool = False) -> Prompt:
    """A needle prompt: a named 7-digit number hidden inside real text (``haystack`` token ids)."""
    name, key = rng.choice(NEEDLE_NAMES), str(rng.randint(1_000_000, 9_999_999))
    return assemble(tokenizer, length, depth, intro=NEEDLE_INTRO, haystack=haystack,
                    needle=NEEDLE_SENTENCE.format(name=name, key=key), question=NEEDLE_QUESTION.format(name=name),
                    answer=f" {key}", lead=NEEDLE_LEAD.format(name=name), chat=chat)


def check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
