"""Build the reference model's corpus from text that Debian packages install (offline, reproducible).

Run ``python -m longreach.reference_model.corpus OUT_DIR`` after
``apt-get install linux-doc-6.1 python3.11-doc dict-gcide debian-reference-en`` (the Python standard
library comes with ``libpython3.11-stdlib``). It writes ``train.jsonl.xz`` and ``heldout.jsonl.xz``
(one ``{"source", "name", "text"}`` document per line), ``manifest.json`` (package versions,
licences, counts), ``evaluation.jsonl.xz`` (long held-out documents, shipped in the package) and
``haystack.jsonl.xz`` (more held-out documents, shipped too, for haystacks of a million tokens).
Documents are kept whole; the split is a hash of the document name.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LONG_DOCUMENT = 120_000  # characters (~30K tokens): documents the long-context evaluations draw on
DICTIONARY_CHUNK = 400_000  # characters per document cut from the dictionary (it has no long texts)


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    licence: str
    root: str


SOURCES = (
    Source("linux-doc", "linux-doc-6.1", "GPL-2.0 (some files dual GPL-2.0 / CC-BY-4.0)",
           "/usr/share/doc/linux-doc-6.1/Documentation"),
    Source("python-doc", "python3.11-doc", "PSF-2.0", "/usr/share/doc/python3.11/html/_sources"),
    Source("gcide", "dict-gcide", "GPL-2.0-or-later (Webster's 1913 text: public domain)",
           "/usr/share/dictd/gcide.dict.dz"),
    Source("debian-reference", "debian-reference-en", "GPL-2.0-or-later",
           "/usr/share/debian-reference/debian-reference.en.txt.gz"),
    Source("python-stdlib", "libpython3.11-stdlib", "PSF-2.0", "/usr/lib/python3.11"),
)


def _read(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix in (".gz", ".dz") else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _linux_doc(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(root.rglob("*")):
        if re.search(r"\.(rst|txt)(\.gz)?$", path.name):
            yield str(path.relative_to(root)), _read(path)


def _python_doc(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(root.rglob("*.rst.txt")):
        yield str(path.relative_to(root)), _read(path)


def _gcide(path: Path) -> Iterator[tuple[str, str]]:
    text = _read(path)
    start = 0
    while start < len(text):
        end = text.find("\n\n", start + DICTIONARY_CHUNK)
        end = len(text) if end < 0 else end + 2
        yield f"gcide-{start:09d}", text[start:end]
        start = end


def _single(path: Path) -> Iterator[tuple[str, str]]:
    yield path.name, _read(path)


def _python_stdlib(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] not in ("test", "idlelib", "lib2to3", "site-packages", "dist-packages"):
            yield str(relative), _read(path)


READERS = {"linux-doc": _linux_doc, "python-doc": _python_doc, "gcide": _gcide,
           "debian-reference": _single, "python-stdlib": _python_stdlib}


def _hash(doc: dict) -> int:
    return int(hashlib.sha1(f"{doc['source']}/{doc['name']}".encode()).hexdigest(), 16)


def heldout_names(docs: list[dict]) -> set[str]:
    """One source's held-out split: a third of its long documents (at least one), 1 in 50 of the rest.

    Long documents are held out per source so that every kind of text has long held-out documents.
    """
    long = sorted((d for d in docs if len(d["text"]) >= LONG_DOCUMENT), key=_hash)
    chosen = {d["name"] for d in long[:max(1, len(long) // 3)]}
    return chosen | {d["name"] for d in docs if len(d["text"]) < LONG_DOCUMENT and _hash(d) % 50 == 0}


def documents(source: Source) -> Iterator[dict]:
    """The documents of one source, whitespace-normalised, empty ones dropped."""
    root = Path(source.root)
    if not root.exists():
        raise FileNotFoundError(f"{root} is missing: apt-get install {source.package}")
    for name, text in READERS[source.name](root):
        text = re.sub(r"[ \t]+\n", "\n", text).strip()
        if text:
            yield {"source": source.name, "name": name, "text": text}


def _version(package: str) -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def build(out: Path) -> dict:
    """Write the corpus under ``out`` and return its manifest."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    with lzma.open(out / "train.jsonl.xz", "wt") as train, lzma.open(out / "heldout.jsonl.xz", "wt") as heldout:
        for source in SOURCES:
            tally = counts.setdefault(source.name, {"train_docs": 0, "heldout_docs": 0, "characters": 0})
            docs = list(documents(source))
            held = heldout_names(docs)
            for doc in docs:
                split = "heldout" if doc["name"] in held else "train"
                (heldout if split == "heldout" else train).write(json.dumps(doc) + "\n")
                tally[f"{split}_docs"] += 1
                tally["characters"] += len(doc["text"])
    manifest = {"sources": [{"name": s.name, "package": s.package, "version": _version(s.package),
                             "licence": s.licence, "path": s.root, **counts[s.name]} for s in SOURCES]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_evaluation_set(corpus: Path, out: Path, per_source: int = 2) -> list[str]:
    """Copy the first ``per_source`` long held-out documents of each source to ``out`` (``*.jsonl.xz``).

    This is the set the package ships for the needle and perplexity evaluations.
    """
    taken: dict[str, int] = {}
    names = []
    with lzma.open(out, "wt") as sink:
        for doc in read(corpus / "heldout.jsonl.xz"):
            if len(doc["text"]) >= LONG_DOCUMENT and taken.get(doc["source"], 0) < per_source:
                taken[doc["source"]] = taken.get(doc["source"], 0) + 1
                names.append(f"{doc['source']}/{doc['name']}")
                sink.write(json.dumps(doc) + "\n")
    return names


def write_haystack_set(corpus: Path, out: Path, shipped: Path, dictionary_chunks: int = 3) -> int:
    """Copy every held-out document that ``shipped`` (the evaluation set) lacks to ``out``, except that the
    dictionary, which is most of the held-out text and the least like prose, gives only its first
    ``dictionary_chunks`` chunks. Returns the characters written (with ``shipped``'s, some 1.2M SmolLM2 tokens)."""
    names = {(doc["source"], doc["name"]) for doc in read(shipped)}
    written, chunks = 0, 0
    with lzma.open(out, "wt") as sink:
        for doc in read(corpus / "heldout.jsonl.xz"):
            if (doc["source"], doc["name"]) in names:
                continue
            if doc["source"] == "gcide":
                if chunks == dictionary_chunks:
                    continue
                chunks += 1
            written += len(doc["text"])
            sink.write(json.dumps(doc) + "\n")
    return written


def read(path: Path) -> Iterator[dict]:
    """Iterate over the documents of a ``*.jsonl.xz`` split."""
    with lzma.open(path, "rt") as lines:
        for line in lines:
            yield json.loads(line)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m longreach.reference_model.corpus OUT_DIR")
    print(json.dumps(build(Path(sys.argv[1])), indent=2))
    print(write_evaluation_set(Path(sys.argv[1]), Path(sys.argv[1]) / "evaluation.jsonl.xz"))
    print(write_haystack_set(Path(sys.argv[1]), Path(sys.argv[1]) / "haystack.jsonl.xz",
                             Path(sys.argv[1]) / "evaluation.jsonl.xz"), "haystack characters")
