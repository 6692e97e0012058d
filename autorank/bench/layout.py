"""Training-step time in the default (NCHW-contiguous) layout vs channels-last, side by side.

One SGD step (forward, cross-entropy, backward, optimizer step) of the default model with a plan
applied, alternating the two layouts for --rounds rounds; prints each layout's median seconds per
step and the ratio. The numbers and gradients are the same in both layouts
(tests/test_channels_last.py); the default workload trains channels-last on CPU
(trainer.channels_last: auto).

    autorank-bench layout                       # 112 px, batch 128, mcunet_like x0.5
    autorank-bench layout --size 64 --threads 1 --plans all first2=asi@0.9:b
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from autorank.bench.fidelity import PLAN_NAMES, build_plans
from autorank.models import mcunet_like
from autorank.plan import apply_plan, finetune_mode
from autorank.workload.module import to_layout


class Stepper:
    """One model copy in one layout with its optimizer; ASI's subspaces warm after the first step."""

    def __init__(self, model, x, y, channels_last: bool) -> None:
        self.m = copy.deepcopy(model)
        if channels_last:
            self.m.to(memory_format=torch.channels_last)
        self.x, self.y = to_layout(x, channels_last), y
        self.opt = torch.optim.SGD([p for p in self.m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def time(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            F.cross_entropy(self.m(self.x), self.y).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / steps


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round (after one warm-up)")
    ap.add_argument("--plans", nargs="+", default=["all", "first2=asi@0.9:b", "last4"], help=PLAN_NAMES)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = finetune_mode(mcunet_like(num_classes=5, width_mult=args.width), True)
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 5, (args.batch,))
    print(f"# mcunet_like x{args.width}, {args.size} px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median s/step over {args.rounds} alternating rounds of {args.steps} steps")
    for name, (plan, _) in build_plans(base, args.plans, x).items():
        model = apply_plan(copy.deepcopy(base), plan)
        steppers = {cl: Stepper(model, x, y, cl) for cl in (False, True)}
        t = {False: [], True: []}
        for st in steppers.values():
            st.time(1)  # warm-up (ASI: the first step computes the subspaces from scratch)
        for _ in range(args.rounds):
            for cl in (False, True):
                t[cl].append(steppers[cl].time(args.steps))
        a, b = statistics.median(t[False]), statistics.median(t[True])
        print(f"{name:>16}  contiguous {a:6.3f} s  channels_last {b:6.3f} s  ratio {a / b:5.2f}x", flush=True)
