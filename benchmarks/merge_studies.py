"""One table and plot from several runs of ``extend_model.py`` (e.g. one process per recipe, run side by side).

    python benchmarks/merge_studies.py OUT RUN_DIR... [--cells LABEL=FILE.json[@SETUP] ...]

Each RUN_DIR holds an ``extend_model.json`` (a run's, or one this script wrote); their trainings and records are
joined into ``OUT/extend_model.json`` (each run's options and seconds kept under ``parts``), with one plot per
evaluation and the tables printed. ``--cells LABEL=FILE`` adds the records of a ``smollm2.py`` result file (for
example a saved tuned model evaluated further, at 4M tokens) under the setup name LABEL; with ``@SETUP`` only
the file's records of that setup.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longreach.evals import report


def merge(runs: list[Path], cells: list[tuple[str, Path, str]]) -> dict:
    """The joined result: ``{parts, training, records}``."""
    merged: dict = {"parts": {}, "training": {}, "records": {}}
    for folder in runs:
        result = json.loads((folder / "extend_model.json").read_text())
        merged["parts"].update(result.get("parts") or
                               {str(folder): {k: result.get(k) for k in ("model", "device", "options", "seconds")}})
        merged["training"].update(result["training"])
        for kind, rows in result["records"].items():
            merged["records"].setdefault(kind, []).extend(rows)
    for label, path, setup in cells:
        result = json.loads(path.read_text())
        merged["parts"][f"{path}@{setup}" if setup else str(path)] = {k: v for k, v in result.items()
                                                                       if k != "records"}
        rows = [{**r, "setup": label} for r in result["records"]
                if "error" not in r and (not setup or r["setup"] == setup)]
        merged["records"].setdefault(result["command"], []).extend(rows)
    return merged


def cell(spec: str) -> tuple[str, Path, str]:
    label, _, source = spec.partition("=")
    path, _, setup = source.partition("@")
    if not label or not path:
        raise argparse.ArgumentTypeError(f"write LABEL=FILE.json[@SETUP], got {spec!r}")
    return label, Path(path), setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--cells", type=cell, nargs="*", default=[])
    args = parser.parse_args()
    merged = merge(args.runs, args.cells)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "extend_model.json").write_text(json.dumps(merged, indent=1) + "\n")
    for kind, rows in merged["records"].items():
        report.plot(kind, rows, args.out / f"{kind}.png")
        print(report.table(kind, rows), "\n")


if __name__ == "__main__":
    main()
