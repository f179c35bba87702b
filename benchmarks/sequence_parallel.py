"""One sequence-parallel LoRA fine-tuning step of a Llama-2-7B-shaped model (random weights), per method.

Run with torchrun on N GPUs: ``torchrun --nproc-per-node N benchmarks/sequence_parallel.py --length 256k
--methods dense,select_merge --out DIR`` (``--tiny``: a 2-layer model of the same head layout, on the CPU
with gloo, to check the script). Each method runs one untimed step (Triton autotuning), then one timed
step over N ranks at ``--length`` tokens, then (``--single``) rank 0 alone at length / N tokens, the same
tokens per GPU, while the others wait. Recorded per step: seconds, tokens per second per GPU, the peak
memory of each rank, and the seconds the ranks spent in the all-to-all exchanges (torch.profiler device
or CPU time of the collective, mean over ranks). ``--shard-weights`` splits the weights and optimizer
state over the ranks (FSDP2); rank 0's single step then runs on a whole copy beside its shard, which its
peak memory includes. Rank 0 writes ``OUT/sequence_parallel_N.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from finetune import LLAMA2_7B  # the sibling single-GPU benchmark's model shape
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from longreach.cli import parse_lengths
from longreach.parallel import join
from longreach.train import FinetuneConfig, finetune, prepare
from longreach.train.recipe import configure

TINY = {**LLAMA2_7B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}


def build(shape: dict, device: torch.device, sp=None) -> torch.nn.Module:
    """The LoRA model; with ``sp`` its weights and optimizer state split over the ranks (FSDP2)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)  # the same weights on every rank
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
    return prepare(model, FinetuneConfig(length=1, steps=1, attention="dense", position=None, sequence_parallel=sp,
                                         shard_weights=sp is not None))


def exchange_seconds(prof) -> float:
    """Seconds in the all-to-all collectives of a profile: the largest total among the events named for
    them (nested records of one call repeat its time), device time where recorded, else CPU time."""
    names = ("all_to_all", "alltoall")
    times = [getattr(e, "device_time_total", 0.0) or e.cpu_time_total for e in prof.key_averages()
             if any(n in e.key.lower() for n in names)]
    return max(times, default=0.0) / 1e6


def step(model, method: str, length: int, sp, device: torch.device, vocab: int, offload: bool,
         shard_weights: bool = False) -> dict:
    config = FinetuneConfig(length=length, steps=1, attention=method, position=None, warmup=0, sequence_parallel=sp,
                            offload_activations=offload, shard_weights=shard_weights)
    configure(model.get_base_model(), config)
    rows = torch.randint(0, vocab, (1, length + 1), generator=torch.Generator().manual_seed(length))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        history = finetune(model, rows, config, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    ranks = sp.size if sp is not None else 1
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"method": method, "length": length, "ranks": ranks, "offload": offload, "shard_weights": shard_weights,
            "step_seconds": seconds,
            "tokens_per_second_per_gpu": length / seconds / ranks, "peak_gib": peak,
            "exchange_seconds": exchange_seconds(prof) if sp is not None else 0.0, "loss": history[0]["loss"]}


def gathered(record: dict, sp) -> dict:
    """``record`` with the peak memory and exchange seconds of every rank (rank order)."""
    parts = [None] * sp.size
    dist.all_gather_object(parts, record, group=sp.group)
    return {**record, "peak_gib": [p["peak_gib"] for p in parts],
            "exchange_seconds": sum(p["exchange_seconds"] for p in parts) / sp.size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=lambda s: parse_lengths(s)[0], required=True)
    parser.add_argument("--methods", default="dense,select_merge")
    parser.add_argument("--single", action=argparse.BooleanOptionalAction, default=True,
                        help="also rank 0 alone at length / N tokens")
    parser.add_argument("--offload", action="store_true", help="offload saved activations to host memory")
    parser.add_argument("--shard-weights", action="store_true",
                        help="split the weights and optimizer state over the ranks (FSDP2)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: check the script on the CPU")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    sp, device = join(int(os.environ["WORLD_SIZE"]), "cuda" if cuda else "cpu")
    device = torch.device(device)
    shape = TINY if args.tiny else LLAMA2_7B
    model = build(shape, device, sp if args.shard_weights else None)
    whole = build(shape, device) if args.shard_weights and args.single and sp.rank == 0 else model
    records = []

    def run(method, length, parallel):
        sharded = args.shard_weights and parallel is not None
        return step(model if parallel is not None else whole, method, length, parallel, device, shape["vocab_size"],
                    args.offload, sharded)

    for method in args.methods.split(","):
        run(method, args.length, sp)  # warm-up
        records.append(gathered(run(method, args.length, sp), sp))
        if args.single:
            if sp.rank == 0:
                run(method, args.length // sp.size, None)
                records.append(run(method, args.length // sp.size, None))
            dist.barrier()
        if sp.rank == 0:
            print(json.dumps(records[-2:] if args.single else records[-1:]), flush=True)
    if sp.rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name() if cuda else "cpu"
        (args.out / f"sequence_parallel_{sp.size}.json").write_text(
            json.dumps({"device": name, "ranks": sp.size, "model": shape, "records": records}, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
