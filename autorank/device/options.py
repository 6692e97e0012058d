"""The device runner's command line: its options, and the checks of their values made before any
file is read."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from autorank.device.inputs import DEFAULT_LR, MAX_LR, BadInput
from autorank.io import check_output
from autorank.plan.plan import SEED_RANGE

INT64_MAX = 2**63 - 1


def check_args(a: argparse.Namespace) -> None:
    """The numbers and paths on the command line, before any file is read: BadInput naming the
    option, the value and what is allowed."""
    if a.batch_size is not None and a.batch_size < 1:
        raise BadInput(f"--batch-size must be >= 1, got {a.batch_size} (leave it out for the plan's batch)")
    if a.steps is not None and a.steps < 1:
        raise BadInput(f"--steps must be >= 1, got {a.steps} (leave it out to train every epoch)")
    if a.epochs < 0:
        raise BadInput(f"--epochs must be >= 0 (0: load, check and evaluate without training), got {a.epochs}")
    for name, value in (("--batch-size", a.batch_size), ("--steps", a.steps), ("--epochs", a.epochs)):
        if value is not None and value > INT64_MAX:
            raise BadInput(f"{name} must be at most {INT64_MAX} (a 64-bit count), got {value}")
    if a.lr is not None and not (math.isfinite(a.lr) and a.lr > 0):
        raise BadInput(f"--lr must be a finite number > 0, got {a.lr} (leave it out for the plan's lr)")
    if a.lr is not None and a.lr > MAX_LR:
        raise BadInput(f"--lr must be at most {MAX_LR:g}, got {a.lr:g}: SGD would leave the weights "
                       "infinite after one step; pass a usual value (e.g. 0.01)")
    if a.seed is not None and not SEED_RANGE[0] <= a.seed <= SEED_RANGE[1]:
        raise BadInput(f"--seed must be a whole number in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {a.seed}")
    if not (math.isfinite(a.momentum) and 0 <= a.momentum < 1):
        raise BadInput(f"--momentum must lie in [0, 1), got {a.momentum}")
    for name in ("plan", "checkpoint"):
        path = getattr(a, name)
        if Path(path).is_dir():
            raise BadInput(f"{name} {path} is a directory: pass the {name} file itself")
    if a.out:  # before any work: never one of the inputs, and a folder that takes a new file
        check_output(a.out, what="--out", error=BadInput,
                     inputs={"the plan file": a.plan, "the checkpoint": a.checkpoint, "the data file": a.data})


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="autorank-device",
                                 description="Fine-tune with an exported plan on the device, with torch alone.")
    ap.add_argument("plan")
    ap.add_argument("checkpoint")
    ap.add_argument("data", help="a tensor file (torch.save of {'x', 'y'}) or an image folder ROOT/<class>/<image>")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None,
                    help="stop after this many training steps in all (a quick check of the plan's memory)")
    ap.add_argument("--lr", type=float, default=None,
                    help=f"SGD learning rate (default: the plan's meta lr if it records one, else {DEFAULT_LR})")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the plan's input_shape[0]")
    ap.add_argument("--model", default=None, help="module:function (default: the plan's meta.model)")
    ap.add_argument("--model-kwargs", default=None, help="JSON kwargs for --model")
    ap.add_argument("--out", default=None, help="save the fine-tuned base-model state dict here")
    ap.add_argument("--keep-head", action="store_true",
                    help="keep the checkpoint's classifier head (default: a fresh one, as the search trained)")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the fresh head (default: the plan's meta.seed, the search's trainer.seed, else 0)")
    ap.add_argument("--predict-here", action="store_true",
                    help="predict the training peak here even when the plan file records one for this batch")
    ap.add_argument("--ignore-memory-check", action="store_true",
                    help="train even when the predicted process peak is above the memory this process may use")
    return ap.parse_args(argv)
