"""Render evaluation records: a text table, a JSON file and a PNG plot per evaluation."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _grid(records: list[dict], value: str) -> tuple[list[str], list[int], dict]:
    setups = list(dict.fromkeys(r["setup"] for r in records))
    lengths = sorted({r["length"] for r in records})
    cells: dict = defaultdict(list)
    for r in records:
        cells[r["setup"], r["length"]].append(r[value])
    return setups, lengths, {key: sum(v) / len(v) for key, v in cells.items()}


def _format(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(kind: str, records: list[dict]) -> str:
    """A setups x lengths table: mean accuracy (passkey, needle), perplexity, or seconds and peak MiB."""
    if kind == "efficiency":
        width = max(18, *(len(_series(r)) for r in records))
        rows = [f"{'setup':<{width}} {'length':>8} {'mode':<17} {'seconds':>9} {'tokens/s':>10} {'peak MiB':>9}"]
        rows += [f"{_series(r):<{width}} {r['length']:>8} {r['mode']:<17} {_format(r['seconds'], '9.4f'):>9} "
                 f"{_format(r['tokens_per_second'], '10.0f'):>10} {_format(r['peak_mib'], '9.1f'):>9}"
                 + (f"  {r['error']}" if r.get("error") else "") for r in records]
        return "\n".join(rows)
    value, fmt = ("perplexity", "8.2f") if kind == "perplexity" else ("accuracy", "8.2f")
    setups, lengths, cells = _grid(records, value)
    width = max([18, *(len(s) for s in setups)])
    rows = [f"{kind} ({value}; rows: setups, columns: lengths in tokens)",
            f"{'setup':<{width}}" + "".join(f"{n:>9}" for n in lengths)]
    rows += [f"{s:<{width}}" + "".join(f" {_format(cells.get((s, n)), fmt):>8}" for n in lengths) for s in setups]
    return "\n".join(rows)


def _heatmaps(records: list[dict], title: str, columns: int = 5):
    setups = list(dict.fromkeys(r["setup"] for r in records))
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    ncols = min(columns, len(setups))
    nrows = -(-len(setups) // ncols)
    # Panels keep a readable size however few lengths or depths the grid has.
    width, height = max(2.0, 0.5 * len(lengths)), max(1.4, 0.35 * len(depths) + 0.9)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.2 + width * ncols, 0.8 + height * nrows),
                             squeeze=False, sharey=True, constrained_layout=True)
    lookup = {(r["setup"], r["length"], r["depth"]): r["accuracy"] for r in records}
    for ax in axes.flat[len(setups):]:
        ax.set_visible(False)
    for ax, setup in zip(axes.flat, setups, strict=False):
        grid = [[lookup.get((setup, n, d), float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        if len(lengths) * len(depths) <= 60:
            for (row, col), accuracy in np.ndenumerate(np.array(grid)):
                if accuracy == accuracy:
                    ax.text(col, row, f"{accuracy:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths],
                      rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_title(setup, fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("length (tokens)")
    for ax in axes[:, 0]:
        ax.set_ylabel("depth")
    fig.colorbar(image, ax=axes, label="accuracy", shrink=0.8)
    fig.suptitle(title)
    return fig


def _loss_curves(records: list[dict]):
    fig, ax = plt.subplots(figsize=(7, 4))
    longest = max(r["length"] for r in records)
    for r in records:
        if r["length"] == longest:
            positions, losses = zip(*r["position_loss"], strict=False)
            ax.plot(positions, losses, label=r["setup"])
    ax.set_xlabel(f"position (context of {longest} tokens)")
    ax.set_ylabel("mean loss")
    ax.set_title("loss per position")
    ax.legend(fontsize=8)
    return fig


def _series(record: dict) -> str:
    """An efficiency record's setup, with its implementation and CAB pattern where it has them."""
    if "pattern" not in record:
        return record["setup"]
    impl = "" if record["impl"] == record["setup"] else f"/{record['impl']}"
    return f"{record['setup']}{impl} {record['pattern']}"


def _throughput(records: list[dict]):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict = defaultdict(list)
    for r in records:
        groups[_series(r), r["mode"]].append(r)
    positive = {"seconds": False, "peak_mib": False}
    for (series, mode), rows in groups.items():
        rows = [r for r in rows if r["seconds"] is not None]
        lengths = [r["length"] for r in rows]
        for ax, key in zip(axes, positive, strict=True):
            # Memory read on the CPU can come out as 0 or below: such points are left out of the log scale.
            values = [r[key] if r[key] is not None and r[key] > 0 else float("nan") for r in rows]
            positive[key] |= any(v == v for v in values)
            ax.plot(lengths, values, marker="o", label=f"{series} {mode}")
    for ax, label, key in zip(axes, ("seconds", "peak extra MiB"), positive, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log" if positive[key] else "linear")
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    return fig


def plot(kind: str, records: list[dict], path: Path) -> None:
    """Write the evaluation's figure (heatmaps, loss per position or time and memory) as PNG."""
    if kind in ("passkey", "needle"):
        fig = _heatmaps(records, f"{kind} retrieval accuracy")
    elif kind == "perplexity":
        fig = _loss_curves(records)
    else:
        fig = _throughput(records)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def save(kind: str, records: list[dict], out: Path, meta: dict) -> tuple[Path, Path]:
    """Write ``out/<kind>.json`` (meta + records) and ``out/<kind>.png``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{kind}.json", out / f"{kind}.png"
    json_path.write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")
    plot(kind, records, png_path)
    return json_path, png_path
