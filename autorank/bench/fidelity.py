"""Trial fidelity: how many SGD steps (and which lr) rank fine-tuning plans, per workload.

For each workload (input size x device batch x downstream shift, composed from conf/ like the app)
and each plan, lr and seed: one fine-tuning run of max(--steps) steps with Workload.finetune, the
val accuracy read at every --steps checkpoint of that run, the predicted peak training memory
(autorank.cost.predict_peak_training_bytes at the device batch), the measured saved activation
bytes, and the wall seconds per step. Prints one table per workload and writes every row as JSON.

Plans (names for --plans): the regions head (last linear), last4, last8, f8l4 (first 8 + last 4,
the middle frozen), all (every conv/linear layer), from<k> (every layer from the k-th on: a space
with `fill: full`) and conv<k> (the last k convolutions and the head: the paper's setting), each
trained plainly; and REGION=KEY, KEY a search key of the default space (full, asi@<eps>,
asi@<eps>:b: ASI at HOSVD_eps ranks of each layer's input on one calibration batch, `:b` with the
batch mode kept whole) on the region's leading part, the rest of it plainly:
  f8l4=KEY     KEY on the first 8, the last 4 plainly
  first<k>=KEY KEY on the first k layers, every later layer plainly
  conv<k>=KEY  KEY on the last k convolutions, the head plainly
ASI plans report the plain and the ASI saved bytes of their compressed layers' inputs
(asi_input_bytes, asi_saved_bytes).

    autorank-bench fidelity --sizes 64 --batches 128 --lrs 0.01 0.03 --steps 25 50 100
    autorank-bench fidelity --sizes 96 --shifts none invert --plans head f8l4 f8l4=asi@0.9:b \\
        --seeds 0 1 --out fidelity.json -o model.build.width_mult=0.5
    autorank-bench fidelity -o data=fashion_mnist --sizes 96 --plans conv2 conv2=asi@0.9:b \\
        --lrs 0.01 --steps 100 300 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import re
import time
from pathlib import Path

import torch
from torch import nn

from autorank.cost import predict_peak_training_bytes, train_step_flops
from autorank.plan import Choice, Plan, candidate_layers
from autorank.shortcut import ASIConv2d, ASILinear, hosvd_ranks

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

MB = 2**20
FIXED_PLANS = ("head", "last4", "last8", "f8l4", "all")
# REGION=KEY: KEY is a search key (full, asi@0.9, asi@0.9:b) on the region's leading part
KEYED_RE = re.compile(r"^(f8l4|first(\d+)|conv(\d+))=(full|asi@(\d*\.?\d+)(:b)?)$")
PLAN_NAMES = "head, last4, last8, f8l4, all, from<k>, conv<k>, or REGION=KEY (f8l4, first<k>, conv<k> = full, asi@<eps>, asi@<eps>:b)"
FROM_RE = re.compile(r"^from(\d+)$")
CONV_RE = re.compile(r"^conv(\d+)$")


def compose(size: int | None, batch: int | None, shift: str, seed: int, cache_dir: str, overrides: list[str],
            checkpoint=None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    out = Path(cache_dir) / "outputs"
    ov = ["+device=rpi4", f"paths.root={out}", f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}",
          f"trainer.seed={seed}", "data.seed=0"]
    # size / batch None: the data option's own (a text option has no input_size)
    ov += [f"data.input_size={size}"] * (size is not None) + [f"data.batch_size={batch}"] * (batch is not None)
    if shift != "none":
        ov.append(f"++data.downstream_shift={shift}")
    if checkpoint is not None:  # seeds > first: the same base model, another head init and order
        ov.append(f"model.checkpoint={checkpoint}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*ov, *overrides])


def layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named layer's input on batch x (no grad, the model in its fine-tuning mode)."""
    seen, handles = {}, []
    for name in names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0].detach())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def asi_choices(model: nn.Module, names: list[str], inputs: dict, eps: float, keep_batch: bool):
    """ASI choices at HOSVD_eps ranks of each layer's calibration input: (choices, ranks, plain input
    bytes, ASI saved bytes)."""
    choices, ranks, plain, saved = {}, {}, 0, 0
    for n in names:
        x = inputs[n]
        r = hosvd_ranks(x, eps)
        if keep_batch:
            r[0] = x.shape[0]
        mod = model.get_submodule(n)
        wrapper = (ASIConv2d if isinstance(mod, nn.Conv2d) else ASILinear)(mod, r)
        plain += x.numel() * x.element_size()
        saved += wrapper.saved_bytes(tuple(x.shape), x.dtype)
        choices[n], ranks[n] = Choice.asi(r), r
    return choices, ranks, plain, saved


def build_plans(model: nn.Module, names: list[str], calib_x: torch.Tensor) -> dict[str, tuple[Plan, dict]]:
    """name -> (Plan, info); info has the ASI ranks and the compressed layers' saved input bytes."""
    layers = candidate_layers(model)
    convs = [n for n in layers if isinstance(model.get_submodule(n), nn.Conv2d)]
    first8, last4, head = layers[:8], layers[-4:], layers[-1:]
    full = Choice.full()
    fixed = {"head": head, "last4": last4, "last8": layers[-8:], "f8l4": first8 + last4, "all": layers}
    inputs = layer_inputs(model, first8, calib_x)
    plans = {}
    for name in names:
        if name in fixed:
            info = {"asi_input_bytes": sum(x.numel() * x.element_size() for x in inputs.values())} \
                if name in ("f8l4", "all") else {}
            plans[name] = (Plan(layers={n: full for n in fixed[name]}), info)
            continue
        f, c, m = FROM_RE.match(name), CONV_RE.match(name), KEYED_RE.match(name)
        if f:  # a contiguous region: every layer from the k-th on, plainly
            plans[name] = (Plan(layers={n: full for n in layers[int(f.group(1)):]}), {})
            continue
        if c:  # the last k convolutions and the head, plainly
            k = int(c.group(1))
            inputs.update(layer_inputs(model, [n for n in convs[-k:] if n not in inputs], calib_x))
            info = {"asi_input_bytes": sum(inputs[n].numel() * inputs[n].element_size() for n in convs[-k:])}
            plans[name] = (Plan(layers={n: full for n in convs[-k:] + head}), info)
            continue
        if not m:
            raise SystemExit(f"unknown plan {name!r}: use {PLAN_NAMES}")
        if m.group(3):  # conv<k>=KEY: the last k convolutions, the head plainly
            keyed, rest = convs[-int(m.group(3)):], head
        elif m.group(2):  # first<k>=KEY: the first k, every later layer plainly
            keyed, rest = layers[:int(m.group(2))], layers[int(m.group(2)):]
        else:  # f8l4=KEY
            keyed, rest = first8, last4
        inputs.update(layer_inputs(model, [n for n in keyed if n not in inputs], calib_x))
        if m.group(4) == "full":
            plain_bytes = sum(inputs[n].numel() * inputs[n].element_size() for n in keyed)
            plans[name] = (Plan(layers={n: full for n in keyed + rest}), {"asi_input_bytes": plain_bytes})
            continue
        choices, ranks, plain, saved = asi_choices(model, keyed, inputs, float(m.group(5)), bool(m.group(6)))
        choices.update({n: full for n in rest})
        plans[name] = (Plan(layers=choices), {"ranks": ranks, "asi_input_bytes": plain, "asi_saved_bytes": saved})
    return plans


def run_one(wl, plan: Plan, lr: float, steps: list[int]) -> dict:
    wl.trainer.lr = lr
    try:
        res = wl.finetune(plan, max_steps=max(steps), eval_steps=steps, progress=False)
    except Exception as e:  # noqa: BLE001 - a diverged run is a result (TrainingFailed), not a crash
        return {"failed": f"{type(e).__name__}: {e}"}
    n = max(1, res.extra["steps"])
    return {"acc": {str(k): v for k, v in sorted(res.extra["val_accuracy_at_step"].items())},
            "val_accuracy": res.val_accuracy, "train_loss": res.train_loss, "steps": res.extra["steps"],
            "s_per_step": res.train_wall_s / n, "features_wall_s": res.features_wall_s,
            "measured_saved_mb": res.measured_activation_bytes / MB, "cut": res.cut}


def measure_workload(args, size: int, batch: int, shift: str) -> list[dict]:
    from autorank.workload.workload import Workload

    rows = []
    # one base model (pretrained with --base-seed); each seed fine-tunes it with its own head and order
    base = Workload.from_config(compose(size, batch, shift, args.base_seed, args.cache_dir, args.override))
    t0 = time.perf_counter()
    checkpoint = base.checkpoint_path
    side = json.loads(checkpoint.with_suffix(".json").read_text())
    print(f"# {size}px batch {batch} shift {shift}: base upstream val {side['upstream_val_accuracy']:.3f} "
          f"(EMA BN {side.get('upstream_val_accuracy_ema_bn', float('nan')):.3f}), "
          f"pretraining {side['pretrain_wall_s']:.1f} s (this prepare {time.perf_counter() - t0:.1f} s)", flush=True)
    for seed in args.seeds:
        wl = Workload.from_config(compose(size, batch, shift, seed, args.cache_dir, args.override, checkpoint))
        wl.prepare(progress=False)
        calib_x, _ = wl.calibration_batches(1)[0]
        plans = build_plans(wl.model, args.plans, calib_x)
        example = wl.example_input()
        for name, (plan, info) in plans.items():
            peak = predict_peak_training_bytes(wl.model, example, plan).total_bytes / MB
            for lr in args.lrs:
                r = run_one(wl, copy.deepcopy(plan), lr, args.steps)
                row = {"size": size, "batch": batch, "shift": shift, "seed": seed, "plan": name, "lr": lr,
                       "peak_mb": peak, "fits_budget": peak * MB <= wl.device.budget_bytes, **info, **r,
                       "base_checkpoint": str(checkpoint), "load1": os.getloadavg()[0]}
                rows.append(row)
                print(format_row(row, args.steps), flush=True)
    return rows


def peaks_only(args) -> list[dict]:
    """Predicted peak MB and GFLOP per training step of the plain plans on an untrained model (shapes
    only: no pretraining, no training), for every size x batch."""
    from hydra.utils import instantiate

    from autorank.plan import finetune_mode
    from autorank.models import replace_head

    rows = []
    names = [n for n in args.plans if n in FIXED_PLANS]
    for size, batch in itertools.product(args.sizes, args.batches):
        cfg = compose(size, batch, "none", 0, args.cache_dir, args.override)
        spec, device = instantiate(cfg.model), instantiate(cfg.device)
        model = finetune_mode(replace_head(spec(num_classes=5), 5, seed=0), True)
        x = torch.zeros(batch, 3, size, size)
        plans = build_plans(model, names, x[:2])
        cells = []
        for name, (plan, _) in plans.items():
            peak = predict_peak_training_bytes(model, x, plan).total_bytes / MB
            gflop = train_step_flops(model, x, plan) / 1e9
            rows.append({"size": size, "batch": batch, "plan": name, "peak_mb": peak, "gflop_per_step": gflop,
                         "fits_budget": peak * MB <= device.budget_bytes})
            cells.append(f"{name} {peak:6.1f} MB {gflop:5.2f} GF")
        print(f"{size:>4} {batch:>4}  " + " | ".join(cells), flush=True)
    return rows


def ranks_table(args) -> list[dict]:
    """HOSVD_eps ranks of the first 8 layers' inputs (pretrained base, one calibration batch) at each
    --levels eps, and the ASI saved bytes of those inputs, all modes vs the batch mode kept whole."""
    from autorank.workload.workload import Workload

    rows = []
    for size, batch, shift in itertools.product(args.sizes, args.batches, args.shifts):
        wl = Workload.from_config(compose(size, batch, shift, args.seeds[0], args.cache_dir, args.override))
        wl.prepare(progress=False)
        calib_x, _ = wl.calibration_batches(1)[0]
        names = [f"f8l4=asi@{eps:g}{b}" for eps in args.levels for b in ("", ":b")]
        for name, (_, info) in build_plans(wl.model, names, calib_x).items():
            ranks = info["ranks"]
            rows.append({"size": size, "batch": batch, "shift": shift, "plan": name, **info})
            print(f"{size:>4} {batch:>4} {shift:>7} {name:>16}  first-8 inputs {info['asi_input_bytes'] / MB:6.2f} MB"
                  f" -> {info['asi_saved_bytes'] / MB:6.3f} MB  ranks "
                  + " ".join("[" + ",".join(map(str, r)) + "]" for r in ranks.values()), flush=True)
    return rows


def format_row(r: dict, steps: list[int]) -> str:
    head = f"{r['size']:>4} {r['batch']:>4} {r['shift']:>7} {r['seed']:>2} {r['plan']:>16} {r['lr']:>6g}"
    if "failed" in r:
        return f"{head}  FAILED {r['failed'][:60]}  peak {r['peak_mb']:.0f} MB"
    accs = " ".join(f"{r['acc'].get(str(s), float('nan')):.3f}" for s in steps)
    saved = f"  saved {r['measured_saved_mb']:7.2f} MB"
    if "asi_input_bytes" in r:  # the compressed (or, plainly, the same) layers' inputs
        a = r["asi_input_bytes"] / MB
        saved += (f"  inputs {a:.2f} -> {r['asi_saved_bytes'] / MB:.3f} MB ({a * MB / r['asi_saved_bytes']:.0f}x)"
                  if "asi_saved_bytes" in r else f"  inputs {a:.2f} MB")
    return (f"{head}  {accs}  peak {r['peak_mb']:6.1f} MB{saved}  {r['s_per_step']:.3f} s/step  "
            f"load {r['load1']:.1f}")


def main(argv=None, prog=None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64])
    p.add_argument("--batches", type=int, nargs="+", default=[128])
    p.add_argument("--shifts", nargs="+", default=["none"], help="none or a data.downstream_shift value")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200], help="checkpoints of one run")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (head init, order)")
    p.add_argument("--base-seed", type=int, default=0, help="the seed the base model is pretrained with")
    p.add_argument("--plans", nargs="+", default=["head", "last4", "last8", "f8l4", "all", "f8l4=asi@0.9", "f8l4=asi@0.9:b"],
                   help=PLAN_NAMES)
    p.add_argument("--cache-dir", default=str(Path(".cache") / "fidelity"), help="base models, outputs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("-o", "--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--out", default="fidelity.json", help="JSON rows (appended to if it exists)")
    p.add_argument("--peaks-only", action="store_true", help="plain plans' peak MB and GFLOP/step, no training")
    p.add_argument("--ranks", action="store_true", help="HOSVD ranks and ASI bytes at --levels, no training")
    p.add_argument("--levels", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    args = p.parse_args(argv)
    args.steps = sorted(set(args.steps))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    if args.peaks_only or args.ranks:
        rows.extend(peaks_only(args) if args.peaks_only else ranks_table(args))
        out.write_text(json.dumps(rows, indent=1))
        return 0
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
          f"acc at steps {args.steps}", flush=True)
    print(f"#size batch   shift sd      plan     lr  {' '.join(f'{s:>5}' for s in args.steps)}", flush=True)
    for size, batch, shift in itertools.product(args.sizes, args.batches, args.shifts):
        new = measure_workload(args, size, batch, shift)
        rows.extend(new)
        out.write_text(json.dumps(rows, indent=1))  # after each workload: a long run keeps what it did
    return 0
