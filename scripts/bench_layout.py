"""Training-step time in the default (NCHW-contiguous) layout vs channels-last, side by side.

One SGD step (forward, cross-entropy, backward, optimizer step) of the default model with a plan
applied, alternating the two layouts for --rounds rounds; prints each layout's median seconds per
step and the ratio. The numbers and gradients are the same in both layouts
(tests/test_channels_last.py); the default workload trains channels-last on CPU
(trainer.channels_last: auto).

    python scripts/bench_layout.py                       # 112 px, batch 128, mcunet_like x0.5
    python scripts/bench_layout.py --size 64 --threads 1 --plans all asi0.9b:2
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import time

import torch
import torch.nn.functional as F

from autorank.models import mcunet_like
from autorank.plan import Choice, Plan, apply_plan, candidate_layers, finetune_mode
from autorank.shortcut import hosvd_ranks
from autorank.workload.module import to_layout


def make_plan(model, name: str, x: torch.Tensor) -> Plan:
    """all: every conv/linear layer plainly; last4: the last 4; asi<eps>b:<k>: ASI (HOSVD_eps
    ranks of the layer inputs on x, batch mode whole) on the first k layers, the rest plainly."""
    names = candidate_layers(model)
    if name == "all":
        return Plan({n: Choice.full() for n in names})
    if name == "last4":
        return Plan({n: Choice.full() for n in names[-4:]})
    m = re.fullmatch(r"asi(\d*\.?\d+)b:(\d+)", name)
    if m is None:
        raise SystemExit(f"unknown plan {name!r}: all, last4 or asi<eps>b:<k>")
    eps, k = float(m.group(1)), int(m.group(2))
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
             for n in names[:k]]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    layers = {}
    for n in names[:k]:
        r = hosvd_ranks(seen[n], eps)
        r[0] = x.shape[0]
        layers[n] = Choice.asi(r)
    return Plan({**layers, **{n: Choice.full() for n in names[k:]}})


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round (after one warm-up)")
    ap.add_argument("--plans", nargs="+", default=["all", "asi0.9b:2", "last4"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = finetune_mode(mcunet_like(num_classes=5, width_mult=args.width), True)
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 5, (args.batch,))
    print(f"# mcunet_like x{args.width}, {args.size} px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median s/step over {args.rounds} alternating rounds of {args.steps} steps")
    for name in args.plans:
        model = apply_plan(copy.deepcopy(base), make_plan(base, name, x))
        steppers = {cl: Stepper(model, x, y, cl) for cl in (False, True)}
        t = {False: [], True: []}
        for st in steppers.values():
            st.time(1)  # warm-up (ASI: the first step computes the subspaces from scratch)
        for _ in range(args.rounds):
            for cl in (False, True):
                t[cl].append(steppers[cl].time(args.steps))
        a, b = statistics.median(t[False]), statistics.median(t[True])
        print(f"{name:>12}  contiguous {a:6.3f} s  channels_last {b:6.3f} s  ratio {a / b:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
