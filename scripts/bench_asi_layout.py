"""ASI's conv weight gradient in a channels-last training step: the expanded Tucker core `z` in the
default layout (what ConvGeometry.grad_weight passed to torch before the fix) vs in channels-last
(what it passes now, conversion included), gy channels-last, on the default workload's 56x56
layers at batch 128. Alternating rounds in one process; medians.

    python scripts/bench_asi_layout.py --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autorank.shortcut.functional import ConvGeometry  # noqa: E402

LAYERS = {"depthwise 3x3, 24 ch": (nn.Conv2d, dict(in_channels=24, out_channels=24, kernel_size=3, padding=1,
                                                      groups=24, bias=False)),
          "pointwise 1x1, 24->72": (nn.Conv2d, dict(in_channels=24, out_channels=72, kernel_size=1, bias=False))}


def raw_grad_weight(z, w_shape, gy, conv: nn.Conv2d) -> torch.Tensor:
    """torch's convolution backward as grad_weight called it before: z in whatever layout it has."""
    dummy = gy.new_empty(1).expand(w_shape)
    return torch.ops.aten.convolution_backward(gy, z, dummy, None, conv.stride, conv.padding, conv.dilation,
                                               False, [0, 0], conv.groups, (False, True, False))[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=56)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.size}x{args.size}")
    print("| layer | z default layout ms | grad_weight now ms | ratio | max rel diff |")
    print("|---|---:|---:|---:|---:|")
    for name, (cls, kw) in LAYERS.items():
        conv = cls(**kw)
        geom = ConvGeometry(conv)
        z = torch.randn(args.batch, kw["in_channels"], args.size, args.size)  # as the core expands: default layout
        gy = torch.randn(args.batch, kw["out_channels"], args.size, args.size).contiguous(
            memory_format=torch.channels_last)
        times = {"before": [], "now": []}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            a = raw_grad_weight(z, conv.weight.shape, gy, conv)
            times["before"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = geom.grad_weight(z, conv.weight.shape, gy, conv.groups)
            times["now"].append(time.perf_counter() - t0)
        before, now = (statistics.median(times[k]) * 1000 for k in ("before", "now"))
        print(f"| {name} | {before:.1f} | {now:.1f} | {before / now:.1f}x | {((a - b).abs().max() / a.abs().max()).item():.1e} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
