"""Training-step time of the default model with PackedReLU's mask packed the old way (a shift per
element and a sum over 8, the mask flattened in NCHW order) against the current one (one int64
multiply per 8 elements, a channels-last mask packed in its memory order), side by side in one
process, alternating rounds, medians.

    python scripts/bench_packed_relu.py --rounds 5 --steps 3

Plans: every layer plainly ("plain") and the default job's uniform ASI 0.9:b plan ("asi",
docs/bench/uniform_asi09b_plan.json: the ranks trial 3 of the default job chose), on mcunet_like
x0.5 at 112 px, batch 128, channels-last, lean companions on (BN frozen, ReLU6 packed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import autorank.shortcut.lean as lean
from autorank.models import mcunet_like
from autorank.plan import Plan, apply_plan, finetune_mode

PLAN = Path(__file__).resolve().parents[1] / "docs" / "bench" / "uniform_asi09b_plan.json"


def old_pack(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(torch.uint8).view(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(1, dtype=torch.uint8)


def use_old_packing(old: bool) -> None:
    """The old way through the same autograd Function: the old pack_bits, and every mask flattened
    in NCHW order (a channels-last mask copied), as _PackedClampFn did before."""
    lean.pack_bits = old_pack if old else NEW_PACK
    lean.physical_order = (lambda x: None) if old else NEW_ORDER


NEW_PACK, NEW_ORDER = lean.pack_bits, lean.physical_order


def model_for(which: str) -> torch.nn.Module:
    d = json.loads(PLAN.read_text())
    if which == "plain":
        d["layers"] = {k: "full" for k in d["layers"]}
    torch.manual_seed(0)
    m = apply_plan(mcunet_like(num_classes=5, width_mult=0.5), Plan.from_dict(d), strict=False)
    return finetune_mode(m, True).to(memory_format=torch.channels_last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plans", nargs="+", default=["plain", "asi"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for which in a.plans:
        m = model_for(which)
        x = torch.randn(128, 3, 112, 112).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (128,))
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        step()
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(a.rounds):
            for name in ("old", "new"):
                use_old_packing(name == "old")
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    step()
                times[name].append((time.perf_counter() - t0) / a.steps)
        use_old_packing(False)
        o, n = statistics.median(times["old"]), statistics.median(times["new"])
        print(f"{which}: old packing {o:.3f} s/step, new {n:.3f} s/step, ratio {o / n:.2f}x "
              f"(rounds old {[round(v, 2) for v in times['old']]}, new {[round(v, 2) for v in times['new']]})")


if __name__ == "__main__":
    main()
