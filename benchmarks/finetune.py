"""One fine-tuning step of a Llama-2-7B-shaped model (random weights) per attention method and length.

Run on the device: ``python benchmarks/finetune.py --methods dense,select_merge --lengths 16k,32k,64k,128k
--out DIR``. The recipe is longreach's (LoRA r=8 on q/k/v/o, trainable embeddings and norms,
activation checkpointing, bf16, chunked loss); ``dense`` is transformers' own SDPA attention with the
model's RoPE. Each method first runs one untimed step at the shortest length (Triton autotuning),
then one timed step per length: step time, tokens/s and peak GPU memory; out-of-memory is recorded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longreach.cli import parse_lengths
from longreach.hf import restore
from longreach.train import FinetuneConfig, finetune, prepare
from longreach.train.recipe import configure

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def build() -> torch.nn.Module:
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B, attn_implementation="sdpa"))
    torch.set_default_dtype(torch.float32)
    return prepare(model, FinetuneConfig(length=1, steps=1, attention="dense", position=None))


def step(model, method: str, length: int, offload: bool) -> dict:
    base = model.get_base_model()
    config = FinetuneConfig(length=length, steps=1, attention="dense" if method == "dense" else method,
                            position=None, warmup=0, offload_activations=offload)
    if method == "dense":
        restore(base)
    else:
        configure(base, config)
    rows = torch.randint(0, LLAMA2_7B["vocab_size"], (1, length + 1))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        history = finetune(model, rows, config, progress=False)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        return {"method": method, "length": length, "offload": offload, "error": "out of memory"}
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"method": method, "length": length, "offload": offload, "step_seconds": seconds,
            "tokens_per_second": length / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss": history[0]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default="dense,select_merge,s2,sf")
    parser.add_argument("--lengths", default="16k,32k,64k,128k")
    parser.add_argument("--offload", action="store_true", help="offload saved activations to host memory")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = build()
    lengths = parse_lengths(args.lengths)
    records = []
    for method in args.methods.split(","):
        step(model, method, min(lengths), args.offload)  # warm-up: autotuning and allocator
        for length in lengths:
            records.append(step(model, method, length, args.offload))
            print(json.dumps(records[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    name = args.methods.replace(",", "_") + ("_offload" if args.offload else "")
    (args.out / f"finetune_{name}.json").write_text(
        json.dumps({"device": device, "model": LLAMA2_7B, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
