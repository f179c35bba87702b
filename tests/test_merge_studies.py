"""benchmarks/merge_studies.py: runs and extra cells join into one result, and a merged result merges again."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
merge_studies = pytest.importorskip("merge_studies")


def _write(path: Path, result: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return path


def test_a_merged_result_keeps_its_parts_and_cells_take_one_setup(tmp_path):
    run = {"model": "m", "device": "d", "options": {"steps": 2}, "seconds": 1.0, "training": {"sm": {"steps": 2}},
           "records": {"passkey": [{"setup": "tuned sm", "length": 8, "accuracy": 1.0}]}}
    _write(tmp_path / "run" / "extend_model.json", run)
    cells = _write(tmp_path / "cells.json", {"command": "passkey", "records": [
        {"setup": "a", "length": 16, "accuracy": 0.5}, {"setup": "b", "length": 16, "accuracy": 0.0},
        {"setup": "a", "length": 32, "error": "out of memory"}]})
    first = merge_studies.merge([tmp_path / "run"], [])
    _write(tmp_path / "merged" / "extend_model.json", first)
    again = merge_studies.merge([tmp_path / "merged"], [merge_studies.cell(f"x4={cells}@a")])
    assert list(again["parts"]) == [str(tmp_path / "run"), f"{cells}@a"]
    assert again["parts"][str(tmp_path / "run")]["options"] == {"steps": 2}
    assert again["training"] == run["training"]
    assert again["records"]["passkey"] == [run["records"]["passkey"][0],
                                           {"setup": "x4", "length": 16, "accuracy": 0.5}]


def test_a_cell_without_a_file_is_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="LABEL=FILE"):
        merge_studies.cell("x4")
