"""How steady nas's latency measurement is on this machine: three sizes of network, each
measured 20 times as the search measures it (nas.search.measure.measure_latency, one thread, one
inference window); prints, per network, the median of the 20 medians, their interquartile
range and that range as a share of the median.

    python benchmarks/latency_spread.py [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from nas.network.builder import UNetConfig, build_unet, count_parameters
from nas.search.measure import measure_latency

NETWORKS = {
    "small 2D (depth 3, 8 ch)": (UNetConfig(spatial_dims=2, depth=3, base_channels=8), (64, 64)),
    "medium 2D (depth 4, 16 ch)": (UNetConfig(spatial_dims=2, depth=4, base_channels=16),
                                   (128, 128)),
    "3D (depth 3, 8 ch)": (UNetConfig(spatial_dims=3, depth=3, base_channels=8), (48, 48, 32)),
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    cpu = torch.device("cpu")
    print(f"{'network':<28} {'params':>9} {'median ms':>10} {'IQR ms':>8} {'IQR/median':>11}")
    for name, (cfg, window) in NETWORKS.items():
        model = build_unet(cfg)
        medians = [
            measure_latency(model, window, 1, cpu, threads=args.threads).median_ms
            for _ in range(args.repeats)
        ]
        q1, median, q3 = np.percentile(medians, [25, 50, 75])
        print(f"{name:<28} {count_parameters(model):>9,} {median:>10.2f} {q3 - q1:>8.3f} "
              f"{(q3 - q1) / median:>10.1%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
