"""Channels-last training steps with ASI before and after it worked in memory order, side by side in
one process (alternating rounds, medians).

Before: the mode products and the subspace iteration reshaped the logical (N, C, H, W) view, which
copies a channels-last activation (x in the forward, gy in the backward) into the default layout;
grad_input ran torch's convolution backward on an expanded dummy input, which oneDNN copies into a
full-size default-layout tensor. After: both work in the tensor's memory order (tucker.physical_order)
and grad_input is the transposed convolution. "Before" runs through the same autograd Functions with
physical_order disabled and the old grad_input swapped in.

    python scripts/bench_asi_memory_order.py --rounds 5 --steps 3 --threads 2

Part 1: grad_input alone on the default model's layer shapes (batch 128, channels-last gy).
Part 2: whole training steps of mcunet_like x0.5 at 112 px, batch 128, channels-last, lean
companions on: every layer plainly ("plain"), the default job's uniform ASI 0.9:b plan ("asi 0.9:b",
docs/bench/uniform_asi09b_plan.json), and ASI on the first 8 candidates with the rest plain.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import autorank.shortcut.tucker as tucker  # noqa: E402
from autorank.models import mcunet_like  # noqa: E402
from autorank.plan import Plan, apply_plan, finetune_mode  # noqa: E402
from autorank.shortcut.functional import ConvGeometry  # noqa: E402

PLAN = Path(__file__).resolve().parents[1] / "docs" / "bench" / "uniform_asi09b_plan.json"
NOW = {"physical_order": tucker.physical_order, "grad_input": ConvGeometry.grad_input}


def old_grad_input(self, gy, w, x_shape):
    """grad_input as it was (native geometry; the others padded the dummy the same way)."""
    if not self.native:
        return NOW["grad_input"](self, gy, w, x_shape)
    dummy = gy.new_empty(1).expand(x_shape)
    return torch.ops.aten.convolution_backward.default(
        gy, dummy, w, None, self.stride, self.native_padding, self.dilation, False, [0, 0], self.groups,
        (True, False, False))[0]


def use(before: bool) -> None:
    tucker.physical_order = (lambda x: None) if before else NOW["physical_order"]
    ConvGeometry.grad_input = old_grad_input if before else NOW["grad_input"]


def part1(rounds: int) -> None:
    cases = {"depthwise 3x3, 16 ch, 56x56": (nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), 56),
             "depthwise 5x5 stride 2, 32 ch, 56x56": (nn.Conv2d(32, 32, 5, 2, 2, groups=32, bias=False), 56),
             "pointwise 16->64, 28x28": (nn.Conv2d(16, 64, 1, bias=False), 28)}
    print("| layer | before ms | now ms | ratio | max abs diff |\n|---|---:|---:|---:|---:|")
    for name, (conv, s) in cases.items():
        geom = ConvGeometry(conv)
        x = torch.randn(128, conv.in_channels, s, s).contiguous(memory_format=torch.channels_last)
        gy = conv(x).detach().contiguous(memory_format=torch.channels_last)
        w = conv.weight.detach()
        t = {True: [], False: []}
        out = {}
        for _ in range(rounds):
            for before in (True, False):
                use(before)
                t0 = time.perf_counter()
                out[before] = geom.grad_input(gy, w, x.shape)
                t[before].append(time.perf_counter() - t0)
        use(False)
        a, b = statistics.median(t[True]) * 1e3, statistics.median(t[False]) * 1e3
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {(out[True] - out[False]).abs().max().item():.1e} |",
              flush=True)


def model_for(which: str) -> nn.Module:
    d = json.loads(PLAN.read_text())
    names = list(d["layers"])
    if which == "plain":
        d["layers"] = {k: "full" for k in names}
    elif which == "asi 0.9:b first 8":
        d["layers"] = {k: (v if i < 8 else "full") for i, (k, v) in enumerate(d["layers"].items())}
    torch.manual_seed(0)
    m = apply_plan(mcunet_like(num_classes=5, width_mult=0.5), Plan.from_dict(d), strict=False)
    return finetune_mode(m, True).to(memory_format=torch.channels_last)


def part2(rounds: int, steps: int) -> None:
    x = torch.randn(128, 3, 112, 112).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (128,))
    print("\n| plan | before s/step | now s/step | ratio |\n|---|---:|---:|---:|")
    for which in ("plain", "asi 0.9:b", "asi 0.9:b first 8"):
        models = {b: model_for(which) for b in (True, False)}
        opts = {b: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
                for b, m in models.items()}

        def step(b):
            loss = nn.functional.cross_entropy(models[b](x), y)
            opts[b].zero_grad()
            loss.backward()
            opts[b].step()

        t = {True: [], False: []}
        for r in range(rounds + 1):  # round 0 warms up (cold-start subspace iterations, allocator)
            for b in (True, False):
                use(b)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(b)
                if r:
                    t[b].append((time.perf_counter() - t0) / steps)
        use(False)
        a, n = statistics.median(t[True]), statistics.median(t[False])
        print(f"| {which} | {a:.3f} | {n:.3f} | {a / n:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
    part1(args.rounds)
    part2(args.rounds, args.steps)


if __name__ == "__main__":
    main()
