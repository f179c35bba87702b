"""Cost of one pretraining step of the reference architecture, dense against select_merge (run on the device).

``python benchmarks/profile_pretraining.py OUT.json --batch 256 --length 512 --option block_size=32
--option top_k=4`` times forward + backward of random-token rows (bf16 autocast, mean of 5 steps after 3
warm-up steps) under transformers' SDPA and under select_merge with the given options, then records the
CUDA time of select_merge's operators over two profiled steps (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from longreach import extend
from longreach.cli import parse_options
from longreach.reference_model.train import ARCHITECTURE


def step(model, rows: torch.Tensor) -> None:
    with torch.autocast("cuda", torch.bfloat16):
        logits = model(input_ids=rows[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
    loss.backward()


def step_ms(model, rows: torch.Tensor, steps: int = 5) -> float:
    for _ in range(3):
        step(model, rows)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(model, rows)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="select_merge's options")
    args = parser.parse_args()
    options = parse_options(tuple(args.option))
    rows = torch.randint(0, args.vocab, (args.batch, args.length + 1), device="cuda")
    record = {"batch": args.batch, "length": args.length, "options": options, "device": torch.cuda.get_device_name()}
    for name in ("dense", "select_merge"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, **ARCHITECTURE)).cuda()
        if name != "dense":
            extend(model, attention=name, **options)
        record[f"{name}_step_ms"] = step_ms(model, rows)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step(model, rows)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    record["profile_steps"] = 2
    record["cuda_us"] = {e.key: e.device_time_total for e in events[:25] if e.device_time_total}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
