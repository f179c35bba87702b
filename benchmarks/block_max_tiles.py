"""The best-key kernel (``kernels/block_scores.py``) alone, per tile height and key dtype, on the GPU.

    python benchmarks/block_max_tiles.py OUT.json [--rows 16,32,64,128] [--shape pretraining|64k]

``pretraining``: the reference model's pretraining step (batch 256 x 6 heads x 16 query summaries against
2 kv heads of 512 keys, head_dim 64, block 32); ``64k``: benchmarks/attention.py's (32 heads of 1,024
summaries against 64K keys, head_dim 128, block 64). Times ``block_max_scores`` (profile_selection's
``mean_ms``: CUDA events, mean of 10 calls after 3) with ROWS (16-bit keys) and ROWS_FP32 (float32 keys)
set to each ``--rows``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from profile_selection import mean_ms, tiles

from longreach.kernels import block_scores

SHAPES = {"pretraining": ((256, 6, 16, 64), (256, 2, 512, 64), 32),
          "64k": ((1, 32, 1024, 128), (1, 32, 65536, 128), 64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", default="16,32,64,128")
    parser.add_argument("--shape", default="pretraining", choices=sorted(SHAPES))
    args = parser.parse_args()
    q_shape, k_shape, part = SHAPES[args.shape]
    q = torch.randn(q_shape, device="cuda")
    records = []
    for dtype in (torch.bfloat16, torch.float32):
        k = torch.randn(k_shape, device="cuda", dtype=dtype)
        for rows in (int(r) for r in args.rows.split(",")):
            with tiles(ROWS=rows, ROWS_FP32=rows):
                ms = mean_ms(lambda keys=k: block_scores.block_max_scores(q, keys, k_shape[2] // part, part,
                                                                         q_shape[-1] ** -0.5))
            records.append({"dtype": str(dtype).removeprefix("torch."), "rows": rows, "ms": ms})
            print(records[-1], flush=True)
    meta = {"shape": args.shape, "queries": q_shape, "keys": k_shape, "part": part,
            "device": torch.cuda.get_device_name()}
    args.out.write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
