"""How far a CLEX scheme keeps each slow rotary pair inside the angles its model was trained on.

A pair i that turns less than once over the trained length L saw angles up to L * theta_i only; under
frequencies theta'_i it stays in that range up to L * theta_i / theta'_i positions. For each t this prints
the smallest such span over those pairs for a trained scheme (``clex.pt`` from a CLEX fine-tune) and for the
untrained NTK and YaRN starts, against the t * L that t is used for:

    python benchmarks/clex_coverage.py benchmarks/results/smollm2/clex_factor8/clex.pt
"""

from __future__ import annotations

import argparse
import math

import torch

from longreach.clex import Clex


def in_range_span(theta: torch.Tensor, scaled: torch.Tensor, trained: int) -> int:
    slow = 2 * math.pi / theta > trained
    return int((trained * theta / scaled)[slow].min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state", help="a clex.pt a CLEX fine-tune wrote")
    args = parser.parse_args()
    trained = Clex.load(args.state)
    theta = trained.inv_freq
    settings = {k: v for k, v in trained.settings().items() if k != "start"}
    starts = {name: Clex(theta, **settings, start=name) for name in ("ntk", "yarn")}
    length = trained.trained_length
    print(f"{int((2 * math.pi / theta > length).sum())} of {theta.numel()} pairs turn less than once over {length}")
    print("t   t*L      trained  ntk start  yarn start")
    with torch.no_grad():
        for t in range(2, trained.max_factor + 1):
            spans = [in_range_span(theta, s.frequencies(t), length) for s in (trained, *starts.values())]
            print(f"{t:<3} {t * length:<8} " + "  ".join(f"{x:<9}" for x in spans))


if __name__ == "__main__":
    main()
