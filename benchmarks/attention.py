"""Attention benchmark: longreach's sparse methods against SDPA and FlexAttention, in one process.

For each length: PyTorch SDPA causal (dense baseline), then per method: the whole method (block
selection + kernel), the kernel alone on the method's table, and FlexAttention compiled, run on
the identical block mask (built from the same table with BlockMask.from_kv_blocks, no L x L
tensor; non-diagonal blocks marked full so Flex skips their mask). Forward and forward+backward
median times (CUDA events, triton.testing.do_bench), peak memory of forward+backward, and TFLOP/s
counting only the blocks computed (fwd 4*B*B*d per block pair, fwd+bwd 3.5x that; SDPA: the causal
half). For the kernel rows also the device time of the Triton kernels alone (torch.profiler over
five steps, without the table compaction and launch gaps): ``kernel_fwd_ms`` (the forward kernel)
and ``kernel_fwdbwd_ms`` (forward, dQ, dK/dV and the rotary passes). select_merge's kernel
also runs with ``position_mode="absolute"`` (q and k rotated outside, no rotary in the kernel), to
show what the merged-position turn costs. sinks, dca and self_extend (frame methods: q and k
rotated under each position map, then the frame kernel) have one row, the whole method with its
kernels' device time; their FLOPs count one product per block pair, although pairs that straddle
a frame border compute two or three. Past ``--baseline-limit`` tokens only longreach is timed (SDPA and
Flex would take minutes a step), to show how its cost grows. The rotary frequencies live on the GPU, where
``longreach.extend`` puts a model's; ``--rope-device cpu`` leaves them on the host, as the runs before
2026-12-03 did, where each call copies them over and waits for the copy. Writes JSON and a plot.

    python benchmarks/attention.py --out DIR [--lengths 8192,16384] [--heads 32] [--dim 128]
        [--methods dca,sinks] [--baseline-limit 131072]
"""

from __future__ import annotations

import argparse
import json
import platform
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from longreach.attention import METHODS
from longreach.attention.core import Positions
from longreach.attention.select_merge import select_blocks
from longreach.attention.shifted import _shifted_tables, group_size_for, head_shifts
from longreach.attention.sinks import sink_window_tables
from longreach.cli import parse_options
from longreach.kernels import sparse_attention
from longreach.kernels.block_sparse import compact
from longreach.positions import default

# Flex compiles once per length and mask shape; the default limit of 8 graphs is too few here.
torch._dynamo.config.recompile_limit = 64
SPARSE = ("select_merge", "s2", "sf", "sinks", "dca", "self_extend")
# Methods that score pairs under several position maps: the whole method is rotations + frame kernel.
FRAMED = ("sinks", "dca", "self_extend")
# Flex recompiles for every mask shape (about half a minute each on the H100), so by default only
# select_merge, the method the acceptance compares, gets the Flex baseline.
FLEX = ("select_merge",)
SELECTION = ("block_size", "top_k", "local", "sink", "score", "query_rows", "per_head", "representatives", "vote",
             "score_distance")
flex = torch.compile(flex_attention, dynamic=False)


def method_table(name: str, q, k, rope):
    """The key-block table the method uses at its defaults, and its kernel token rule."""
    opts = METHODS[name].defaults()
    b, h, length, _ = q.shape
    if name == "select_merge":
        t = select_blocks(q, k, rope=rope, **{key: opts[key] for key in SELECTION})
        return t, opts["block_size"], {}
    group = group_size_for(length, opts["group_size"])
    sink = opts.get("sink", 0)
    shifts = head_shifts(h, group, opts["shift"], q.device)
    t = _shifted_tables(b, h, length, length, opts["block_size"], group, shifts, sink)
    return t, opts["block_size"], dict(sink=sink, group=group, shift=group // 2)


def flex_mask(table, block: int, length: int, rule: dict) -> BlockMask:
    """Flex's BlockMask from our table: the diagonal block partial (causal), the rest full.

    Flex transposes through an (nq x n_kv_blocks) block matrix, so index rows are n_kv_blocks wide.
    """
    t, count = compact(table)
    b, h, nq, width = t.shape
    n_kv = -(-length // block)
    t = F.pad(t.clamp_min(0), (0, n_kv - width))
    diag = F.pad(t.gather(-1, (count.long() - 1).clamp_min(0)[..., None]), (0, n_kv - 1))
    full = torch.where(torch.arange(n_kv, device=t.device) < (count[..., None] - 1), t, 0)
    if rule:  # S2/SF: group membership cuts inside blocks, so every listed block is partial
        group, shift, sink = rule["group"], rule["shift"], rule["sink"]
        heads = h

        def mask_mod(bi, hi, qi, ki):
            s = torch.where(hi >= heads // 2, shift, 0)
            return (ki <= qi) & (((qi + s) // group == (ki + s) // group) | (ki < sink))

        return BlockMask.from_kv_blocks(count, t, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(length, length))

    def causal(bi, hi, qi, ki):
        return ki <= qi

    return BlockMask.from_kv_blocks(
        torch.ones_like(count), diag, (count - 1).clamp_min(0), full, BLOCK_SIZE=block,
        mask_mod=causal, seq_lengths=(length, length),
    )


def flex_mask_128(table, block: int, length: int) -> BlockMask:
    """The same token-level mask at Flex's default 128-token blocks: a 128 block is full when all four
    of its 64-blocks are listed and it lies below the diagonal, partial when some are; the mask_mod
    looks the 64-block up, so Flex computes exactly the pairs our kernel computes, on its own tiles."""
    t, count = compact(table)
    b, h, nq, width = t.shape
    n = -(-length // block)
    listed = torch.zeros(b, h, nq, n + 1, dtype=torch.bool, device=t.device)
    listed.scatter_(-1, torch.where(t >= 0, t, n).long(), True)
    listed = listed[..., :n]
    pad = n % 2
    coarse = F.pad(listed, (0, pad, 0, pad)).view(b, h, (n + pad) // 2, 2, (n + pad) // 2, 2)
    rows = torch.arange(coarse.shape[2], device=t.device)
    below = rows[None, :] < rows[:, None]
    full = coarse.all(5).all(3) & below
    partial = coarse.any(5).any(3) & ~full

    def ordered(m):
        counts = m.sum(-1).int()
        idx = torch.argsort((~m).int(), dim=-1, stable=True).int()
        return counts, idx

    def mask_mod(bi, hi, qi, ki):
        return (ki <= qi) & listed[bi, hi, qi // block, ki // block]

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=2 * block, mask_mod=mask_mod,
                                    seq_lengths=(length, length))


def flex_runner(table, block, length, rule, q, k, v, grad):
    """Flex on the method's mask: 64-token tiles when inductor accepts them, else 128-token blocks."""
    mask = flex_mask(table, block, length, rule)
    for options in ({"BLOCK_M": block, "BLOCK_N": block, "num_warps": 4, "num_stages": 2},
                    {"BLOCK_M": block, "BLOCK_N": block, "num_warps": 4, "num_stages": 2, "BLOCK_M1": block // 2,
                     "BLOCK_N1": block, "BLOCK_M2": block, "BLOCK_N2": block // 2}):
        try:
            flex(q, k, v, block_mask=mask, kernel_options=options).backward(grad)
            return partial(flex, block_mask=mask, kernel_options=options), "64-token tiles"
        except Exception as error:  # rejected tile shape
            print(f"  flex {options}: {str(error).splitlines()[0][:120]}", flush=True)
        finally:
            for x in (q, k, v):
                x.grad = None
    coarse = flex_mask_128(table, block, length)
    return partial(flex, block_mask=coarse), "128-token blocks, 64-block mask_mod"


def measure(fn, inputs, grad) -> dict:
    """Median forward and forward+backward ms, and peak GiB of forward+backward above the inputs."""
    with torch.no_grad():
        fwd = do_bench(lambda: fn(*inputs), warmup=25, rep=200, return_mode="median")

    def step():
        fn(*inputs).backward(grad)

    both = do_bench(step, warmup=25, rep=200, grad_to_none=list(inputs), return_mode="median")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    for x in inputs:
        x.grad = None
    return {"fwd_ms": fwd, "fwdbwd_ms": both, "peak_extra_gib": peak}


def kernel_times(fn, inputs, grad, steps: int = 5) -> dict:
    """Per-step device ms of longreach's Triton kernels alone, from the profiler's kernel events: forward, the
    sum of all, and each kernel's (the backward's dQ against its dK/dV)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn(*inputs).backward(grad)
            for x in inputs:
                x.grad = None
        torch.cuda.synchronize()
    times = {e.key: e.device_time_total / steps / 1e3 for e in prof.key_averages()}
    kernels = {n: times.get(n, 0.0) for n in ("_fwd_kernel", "_dq_kernel", "_dkv_kernel", "_turn_kernel")}
    return {"kernel_fwd_ms": times["_fwd_kernel"], "kernel_fwdbwd_ms": sum(kernels.values()),
            "kernels_ms": {n.strip("_"): ms for n, ms in kernels.items()}}


def framed_flops(name: str, q) -> float:
    """Forward FLOPs of the blocks a frame method computes (one product per pair of blocks)."""
    opts = METHODS[name].defaults()
    b, h, length, dim = q.shape
    block = opts["block_size"]
    if name == "sinks":
        table = sink_window_tables(b, h, length, length, block, opts["sink"], opts["window"], q.device)
        return 4 * float((table >= 0).sum()) * block * block * dim
    n = -(-length // block)
    return 4 * b * h * n * (n + 1) / 2 * block * block * dim


def bench_method(name: str, q, k, v, grad, rope, dense_flops: float, variants: tuple[str, ...] = (),
                 baselines: bool = True) -> list[dict]:
    """Whole method, kernel alone and (with ``baselines``) Flex on the same mask, for one method at one length;
    for select_merge also the whole method under each of ``variants`` (options ``key=value/key=value``)."""
    length, dim = q.shape[2], q.shape[3]
    pos = Positions.contiguous(1, length, length, "cuda")
    fn = METHODS[name].fn

    def run_method(a, b, c):
        return fn(a, b, c, positions=pos, rope=rope)

    whole = measure(run_method, (q, k, v), grad)
    if name in FRAMED:
        flops = framed_flops(name, q)
        print(f"L={length:>6} {name:<12} longreach {whole['fwdbwd_ms']:.2f} ms fwd+bwd", flush=True)
        return [{"L": length, "impl": "longreach", "method": name, "fwd_flops": flops, **whole,
                 **kernel_times(run_method, (q, k, v), grad)}]
    with torch.no_grad():
        table, block, rule = method_table(name, q, k, rope)
    flops = 4 * float(compact(table)[1].sum()) * block * block * dim
    rows = [("longreach", whole)]
    for spec in variants if name == "select_merge" else ():
        options = parse_options(tuple(spec.split("/")))

        def run_variant(a, b, c, options=options):
            return fn(a, b, c, positions=pos, rope=rope, **options)

        rows.append((f"longreach[{spec}]", measure(run_variant, (q, k, v), grad)))
    variants = [("longreach_kernel", name == "select_merge")]
    if name == "select_merge":
        variants.append(("longreach_kernel_absolute_positions", False))
    for impl, merged in variants:
        def run_kernel(a, b, c, merged=merged):
            return sparse_attention(a, b, c, table, positions=pos, rope=rope, block_size=block, scale=dim**-0.5,
                                    merged_positions=merged, **rule)

        rows.append((impl, {**measure(run_kernel, (q, k, v), grad), **kernel_times(run_kernel, (q, k, v), grad)}))
    if name in FLEX and baselines:
        run_flex, how = flex_runner(table, block, length, rule, q, k, v, grad)
        rows.append(("flex_same_mask", {**measure(run_flex, (q, k, v), grad), "flex_layout": how}))
    print(f"L={length:>6} {name:<12} " + "  ".join(f"{impl} {rec['fwdbwd_ms']:.2f}" for impl, rec in rows)
          + f" ms fwd+bwd; block density {flops / dense_flops / 2:.4f}", flush=True)
    return [{"L": length, "impl": impl, "method": name, "fwd_flops": flops, **rec} for impl, rec in rows]


def run(lengths, heads, dim, out: Path, methods=SPARSE, dtype=torch.bfloat16, variants: tuple[str, ...] = (),
        baseline_limit: int | None = None, rope_device: str = "cuda") -> dict:
    rope = default(dim, 10000.0).to(rope_device)
    records = []
    result = {}
    for length in lengths:
        torch.manual_seed(length)
        q, k, v = (torch.randn(1, heads, length, dim, device="cuda", dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn_like(q)
        dense_flops = 4 * heads * dim * length * length / 2
        baselines = baseline_limit is None or length <= baseline_limit
        if baselines:
            sdpa = measure(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), (q, k, v), grad)
            records.append({"L": length, "impl": "sdpa_causal", "method": "dense", "fwd_flops": dense_flops, **sdpa})
            print(f"L={length:>6} sdpa        fwd {sdpa['fwd_ms']:8.2f} fwd+bwd {sdpa['fwdbwd_ms']:8.2f} ms",
                  flush=True)
        for name in methods:
            records += bench_method(name, q, k, v, grad, rope, dense_flops, variants, baselines)
        del q, k, v, grad
        torch.cuda.empty_cache()
        for r in records:
            r["fwd_tflops"] = r["fwd_flops"] / r["fwd_ms"] / 1e9
            r["fwdbwd_tflops"] = 3.5 * r["fwd_flops"] / r["fwdbwd_ms"] / 1e9
            if "kernel_fwd_ms" in r:
                r["kernel_fwd_tflops"] = r["fwd_flops"] / r["kernel_fwd_ms"] / 1e9
                r["kernel_fwdbwd_tflops"] = 3.5 * r["fwd_flops"] / r["kernel_fwdbwd_ms"] / 1e9
        result = {
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "python": platform.python_version(),
            "config": {"batch": 1, "heads": heads, "head_dim": dim, "dtype": str(dtype), "lengths": lengths,
                       "rope_device": rope_device,
                       "defaults": {n: METHODS[n].defaults() for n in methods}},
            "records": records,
        }
        (out / "attention.json").write_text(json.dumps(result, indent=1))  # kept if a later length fails
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = sorted({(r["method"], r["impl"]) for r in result["records"]})
    for ax, key, label in ((axes[0], "fwdbwd_ms", "forward+backward ms"), (axes[1], "peak_extra_gib", "peak GiB")):
        for method, impl in series:
            rows = [r for r in result["records"] if (r["method"], r["impl"]) == (method, impl)]
            ax.plot([r["L"] for r in rows], [r[key] for r in rows], marker="o", label=f"{method} / {impl}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['device']}: batch 1, {result['config']['heads']} heads, head_dim "
                 f"{result['config']['head_dim']}, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--methods", default=",".join(SPARSE), help=f"comma-separated subset of {SPARSE}")
    parser.add_argument("--select-merge", action="append", default=[], metavar="OPTIONS",
                        help="also time select_merge with these options (key=value/key=value), e.g. today's defaults")
    parser.add_argument("--rope-device", default="cuda", choices=("cuda", "cpu"),
                        help="where the rotary frequencies live (cpu: copied to the GPU each call)")
    parser.add_argument("--baseline-limit", type=int, default=None,
                        help="the longest length that also times SDPA and Flex (longer ones time longreach alone)")
    args = parser.parse_args()
    methods = tuple(args.methods.split(","))
    if unknown := set(methods) - set(SPARSE):
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {SPARSE}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = run([int(x) for x in args.lengths.split(",")], args.heads, args.dim, args.out, methods,
                 variants=tuple(args.select_merge), baseline_limit=args.baseline_limit, rope_device=args.rope_device)
    plot(result, args.out / "attention.png")


if __name__ == "__main__":
    main()
