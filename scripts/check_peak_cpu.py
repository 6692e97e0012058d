"""Compare predict_peak_training_bytes with the live tensor bytes of a real CPU training step.

    python scripts/check_peak_cpu.py [--batch 16] [--size 64] [--models mobilenet_v2 resnet18]

The table of scripts/check_peak_cuda.py (same models and plans), measured on the CPU with
autorank.cost.live.measure_peak_training: one warm-up step, then the peak of one full step
(forward, backward, optimizer.step, zero_grad), everything resident included. Columns: the
prediction, the measurement, their ratio (the aim: 1.00-1.25), where the measured peak was
(forward / backward / step), the measured forward peak, the saved bytes and the time of one
prediction (the meta shadow already built). `check()` returns rows.
mcunet_like needs autorank.models.

--allocator adds what the CPU allocator handed out at its peak (torch.profiler's allocation
events, every allocation a kernel makes included): the gap to the live tensor bytes is the
kernels' own workspace (oneDNN reorders on x86); "with kernels" is the prediction with the
convolutions' backward copies counted (PeakMemory.training_bytes), which it should meet.
"""

from __future__ import annotations

import argparse
import time

import torch

from autorank.cost import predict_peak_training_bytes
from autorank.cost.live import allocator_peak_bytes, make_optimizer, measure_peak_training
from autorank.plan import apply_plan
from check_peak_cuda import models, plans


def check(batch=16, size=64, optimizer="sgd", names=None, allocator=False) -> list[dict]:
    rows = []
    ctors = models()
    for name in names or list(ctors):
        ctor = ctors[name]
        for plan_name, plan in plans(ctor()).items():
            torch.manual_seed(0)
            model = ctor().eval()
            x = torch.randn(batch, 3, size, size)
            y = torch.randint(0, 10, (batch,))
            predict_peak_training_bytes(model, x, plan, optimizer=optimizer)  # builds the meta shadow
            t = time.perf_counter()
            pred = predict_peak_training_bytes(model, x, plan, optimizer=optimizer)
            seconds = time.perf_counter() - t
            if plan is not None:
                apply_plan(model, plan)
            live = measure_peak_training(model, x, y, optimizer)
            phase = max(("forward", live.forward_peak_bytes), ("backward", live.backward_peak_bytes),
                        ("step", live.step_peak_bytes), key=lambda p: p[1])[0]
            alloc = live.resident_bytes + allocator_peak_bytes(model, x, y, optimizer) if allocator else 0
            rows.append({"model": name, "plan": plan_name, "predicted_bytes": pred.total_bytes, "allocator_bytes": alloc,
                         "training_bytes": pred.training_bytes,
                         "measured_bytes": live.peak_bytes, "ratio": pred.total_bytes / live.peak_bytes,
                         "phase": phase, "measured_forward_bytes": live.forward_peak_bytes,
                         "predicted_saved": pred.activation_bytes, "predict_s": seconds, "parts": pred})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    ap.add_argument("--models", nargs="*", default=None, help="default: all of check_peak_cuda.models()")
    ap.add_argument("--allocator", action="store_true", help="also the allocator's peak (torch.profiler)")
    args = ap.parse_args()
    rows = check(args.batch, args.size, args.optimizer, args.models, args.allocator)
    mb = 2**20
    print(f"batch {args.batch}, {args.size} px, {args.optimizer}")
    print(f"{'model':14} {'plan':16} {'predicted MiB':>14} {'measured MiB':>13} {'ratio':>6} {'phase':>9} "
          f"{'fwd meas MiB':>13} {'saved MiB':>10} {'predict ms':>10}" + (" allocator MiB  with kernels MiB" if args.allocator else ""))
    for r in rows:
        print(f"{r['model']:14} {r['plan']:16} {r['predicted_bytes'] / mb:14.2f} {r['measured_bytes'] / mb:13.2f} "
              f"{r['ratio']:6.2f} {r['phase']:>9} {r['measured_forward_bytes'] / mb:13.2f} "
              f"{r['predicted_saved'] / mb:10.2f} {1000 * r['predict_s']:10.1f}"
              + (f" {r['allocator_bytes'] / mb:13.2f} {r['training_bytes'] / mb:16.2f}" if args.allocator else ""))


if __name__ == "__main__":
    main()
