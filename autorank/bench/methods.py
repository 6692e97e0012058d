"""Fine-tuning methods at equal budget on a transformer: plain vs ASI vs LoRA vs LoRA + ASI.

For a model (`--model vit`: vit_tiny on digits_vit; `--model llm`: tiny_llama on stdlib_licenses),
composed from conf/ like the app (autorank.bench.fidelity.compose), and for each k in --blocks
(the last k transformer blocks; the head / lm_head always trained plainly), one plan per method:
  full      every linear layer of the last k blocks plainly trained
  asi       ASI on them at HOSVD_eps(--level) ranks of each input (one calibration batch)
  asib      the same with the batch mode kept whole (ASI's keep-batch variant)
  lora      LoRA rank --lora-rank beside each frozen weight
  lora_asi  LoRA whose A keeps its input at the `asi` ranks
Per run: val accuracy (LM: next-token top-1) and val loss (LM: perplexity = exp(loss)), the
predicted peak MB and predicted saved activation bytes (autorank.cost.predict_peak_training_bytes),
the measured saved bytes of the whole trained region (Workload.finetune), the paper's count (what
the trained linear layers save for their weight gradients: their inputs, compressed for ASI; A's
input and B's rank-wide input for LoRA), training GFLOP per step (train_step_flops), s/step.
--sweep-lrs: each plan is first run on the first seed at each lr; the best (val accuracy, LM: val
loss) is then run on every --seeds seed. The budget line: the largest predicted peak of the asi /
lora_asi plans (or --budget-mb); each row says whether its plan fits it.

    autorank-bench methods --model vit --steps 200 --sweep-lrs 0.01 0.03 0.1 --seeds 0 1 2
    autorank-bench methods --model llm --steps 150 --sweep-lrs 0.03 0.1 0.3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from autorank.bench.fidelity import asi_choices, compose, layer_inputs
from autorank.cost import predict_peak_training_bytes, train_step_flops
from autorank.models import transformer_blocks
from autorank.plan import Choice, Plan, apply_plan, candidate_layers
from autorank.shortcut import ShortcutLayer

MB = 2**20
METHODS = ("full", "asi", "asib", "lora", "lora_asi")
MODELS = {"vit": ["model=vit_tiny", "data=digits_vit", "space=vit", "trainer.pretrain_epochs=8"],
          "llm": ["model=tiny_llama", "data=stdlib_licenses", "space=llm"]}


def region_layers(model: nn.Module, k: int) -> tuple[list[str], str]:
    """(the linear layers of the last k transformer blocks, the head: the last candidate layer)."""
    blocks = transformer_blocks(model)
    if not 1 <= k <= len(blocks):
        raise SystemExit(f"k={k}: the model has {len(blocks)} blocks")
    return [n for _, names in blocks[-k:] for n in names], candidate_layers(model)[-1]


def build_plans(model: nn.Module, calib_x: torch.Tensor, blocks: list[int], methods: list[str],
                level: float, lora_rank: int) -> dict[str, tuple[Plan, dict]]:
    """'<method>@k<k>' -> (Plan, info): info has k, the method, the ASI ranks and the paper's count."""
    plans = {}
    for k in blocks:
        names, head = region_layers(model, k)
        inputs = layer_inputs(model, names + [head], calib_x)
        asi, ranks, _, _ = asi_choices(model, names, inputs, level, keep_batch=False)
        asib, ranks_b, _, _ = asi_choices(model, names, inputs, level, keep_batch=True)
        made = {"full": {n: Choice.full() for n in names}, "asi": asi, "asib": asib,
                "lora": {n: Choice.lora(lora_rank) for n in names},
                "lora_asi": {n: Choice.lora(lora_rank, ranks[n]) for n in names}}
        for m in methods:
            plan = Plan(layers={**made[m], head: Choice.full()})
            info = {"k": k, "method": m, "paper_saved_bytes": paper_saved_bytes(model, plan, inputs)}
            if m in ("asi", "asib", "lora_asi"):
                info["ranks"] = {n: list(r) for n, r in (ranks_b if m == "asib" else ranks).items()}
            plans[f"{m}@k{k}"] = (plan, info)
    return plans


def paper_saved_bytes(model: nn.Module, plan: Plan, inputs: dict[str, torch.Tensor]) -> int:
    """What the trained linear layers save for their weight gradients (the paper's count): a plain
    layer its input, a ShortcutLayer its own saved_bytes (ASI: the Tucker form; LoRA: A's input,
    whole or compressed, and B's rank-wide input); the other ops of the region are not counted."""
    applied = apply_plan(copy.deepcopy(model), plan)
    total = 0
    for name, choice in plan.layers.items():
        if not choice.trained:
            continue
        x, mod = inputs[name], applied.get_submodule(name)
        total += (mod.saved_bytes(tuple(x.shape), x.dtype) if isinstance(mod, ShortcutLayer)
                  else x.numel() * x.element_size())
    return total


def run_plan(wl, plan: Plan, lr: float, steps: int) -> dict:
    wl.trainer.lr = lr
    try:
        res = wl.finetune(copy.deepcopy(plan), max_steps=steps, eval_steps=[steps // 2], progress=False)
    except Exception as e:  # noqa: BLE001 - a diverged run is a result, not a crash
        return {"failed": f"{type(e).__name__}: {e}"}
    n = max(1, res.extra["steps"])
    return {"val_accuracy": res.val_accuracy, "val_loss": res.val_loss,
            "perplexity": math.exp(res.val_loss) if res.val_loss < 50 else float("inf"),
            "train_loss": res.train_loss, "steps": n, "s_per_step": res.train_wall_s / n,
            "measured_saved_bytes": res.measured_activation_bytes,  # halfway: is it still rising?
            "val_accuracy_half": res.extra["val_accuracy_at_step"].get(steps // 2, float("nan"))}


def costs(wl, plan: Plan) -> dict:
    example = wl.example_input()
    peak = predict_peak_training_bytes(wl.model, example, plan, loss=wl.loss)
    return {"peak_mb": peak.total_mb, "predicted_saved_bytes": peak.activation_bytes,
            "gflop_per_step": train_step_flops(wl.model, example, plan) / 1e9}


def better(a: dict, b: dict | None, by: str) -> bool:
    if b is None or "failed" in b:
        return "failed" not in a
    if "failed" in a:
        return False
    return a[by] < b[by] if by == "val_loss" else a[by] > b[by]


def measure(args) -> list[dict]:
    from autorank.workload.workload import Workload

    over = MODELS[args.model] + args.override
    base = Workload.from_config(compose(None, None, "none", args.seeds[0], args.cache_dir, over))
    base.prepare(progress=False)
    checkpoint = base.checkpoint_path
    by = "val_loss" if base.loss == "token" else "val_accuracy"
    calib_x, _ = base.calibration_batches(1)[0]
    plans = build_plans(base.model, calib_x, args.blocks, args.methods, args.level, args.lora_rank)
    info_costs = {name: {**info, **costs(base, plan), "base_checkpoint": checkpoint.name}
                  for name, (plan, info) in plans.items()}
    rows, best_lr = [], {}
    wls = {s: Workload.from_config(compose(None, None, "none", s, args.cache_dir, over, checkpoint))
           for s in args.seeds}
    for name, (plan, _) in plans.items():
        lrs = args.sweep_lrs or [args.lr]
        best = None
        for lr in lrs:  # the sweep, on the first seed
            r = run_plan(wls[args.seeds[0]], plan, lr, args.steps)
            row = emit(rows, args, name, info_costs[name], args.seeds[0], lr, r, sweep=len(lrs) > 1)
            if better(row, best, by):
                best = row
        best_lr[name] = best["lr"] if best else lrs[0]
        if best is not None:
            best["chosen"] = True
        for s in args.seeds[1:]:
            r = run_plan(wls[s], plan, best_lr[name], args.steps)
            emit(rows, args, name, info_costs[name], s, best_lr[name], r, sweep=False)["chosen"] = True
        Path(args.out).write_text(json.dumps(rows, indent=1))  # after each plan: a long run keeps its rows
    return rows


def emit(rows: list, args, name: str, info: dict, seed: int, lr: float, r: dict, sweep: bool) -> dict:
    row = {"model": args.model, "plan": name, "seed": seed, "lr": lr, "sweep": sweep, **info, **r,
           "load1": os.getloadavg()[0]}
    rows.append(row)
    print(format_row(row), flush=True)
    return row


def format_row(r: dict) -> str:
    head = f"{r['plan']:>12} sd {r['seed']} lr {r['lr']:<6g} peak {r['peak_mb']:6.2f} MB"
    if "failed" in r:
        return f"{head}  FAILED {r['failed'][:60]}"
    return (f"{head}  acc {r['val_accuracy']:.3f} loss {r['val_loss']:.3f}  saved {r['measured_saved_bytes'] / MB:6.2f}"
            f" MB (pred {r['predicted_saved_bytes'] / MB:6.2f}) paper {r['paper_saved_bytes'] / MB:6.3f} MB  "
            f"{r['gflop_per_step']:.2f} GF  {r['s_per_step']:.3f} s/step  load {r['load1']:.1f}")


def summary(rows: list[dict], budget_mb: float | None) -> list[dict]:
    """Per plan over its chosen-lr seeds: mean and spread (max - min) of accuracy and loss; fits."""
    chosen = [r for r in rows if r.get("chosen") and "failed" not in r]
    names = list(dict.fromkeys(r["plan"] for r in chosen))
    if budget_mb is None:
        peaks = [r["peak_mb"] for r in chosen if r["method"] in ("asi", "lora_asi")]
        budget_mb = max(peaks) if peaks else float("inf")
    out = []
    for name in names:
        rs = [r for r in chosen if r["plan"] == name]
        acc, loss = [r["val_accuracy"] for r in rs], [r["val_loss"] for r in rs]
        r0 = rs[0]
        out.append({"plan": name, "lr": r0["lr"], "seeds": len(rs), "acc_mean": statistics.fmean(acc),
                    "acc_spread": max(acc) - min(acc), "loss_mean": statistics.fmean(loss),
                    "loss_spread": max(loss) - min(loss), "lm": r0["model"] == "llm",
                    "ppl_mean": statistics.fmean(math.exp(v) for v in loss),
                    "acc_half_mean": statistics.fmean(r["val_accuracy_half"] for r in rs),
                    "peak_mb": r0["peak_mb"], "fits": r0["peak_mb"] <= budget_mb + 1e-9,
                    "budget_mb": budget_mb,
                    "measured_saved_mb": r0["measured_saved_bytes"] / MB,
                    "predicted_equals_measured": all(r["measured_saved_bytes"] == r["predicted_saved_bytes"]
                                                     for r in rs),
                    "paper_saved_mb": r0["paper_saved_bytes"] / MB, "gflop_per_step": r0["gflop_per_step"],
                    "s_per_step": statistics.median(r["s_per_step"] for r in rs)})
    return out


def print_table(summ: list[dict]) -> None:
    if not summ:
        return
    print(f"# budget {summ[0]['budget_mb']:.2f} MB (--budget-mb, else the largest asi / lora_asi peak); "
          "± is half the range over the seeds")
    print("| plan | lr | seeds | val acc (mean ± half range) | acc at half the steps | val loss | perplexity | "
          "peak MB | fits | saved MB (measured = predicted) | paper's count MB | GFLOP/step | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summ:
        ppl = f"{s['ppl_mean']:.2f}" if s["lm"] else "-"
        print(f"| {s['plan']} | {s['lr']:g} | {s['seeds']} | {s['acc_mean']:.3f} ± {s['acc_spread'] / 2:.3f} | "
              f"{s['acc_half_mean']:.3f} | {s['loss_mean']:.3f} ± {s['loss_spread'] / 2:.3f} | {ppl} | {s['peak_mb']:.2f} | "
              f"{'yes' if s['fits'] else 'no'} | {s['measured_saved_mb']:.2f} "
              f"({'yes' if s['predicted_equals_measured'] else 'NO'}) | {s['paper_saved_mb']:.3f} | "
              f"{s['gflop_per_step']:.2f} | {s['s_per_step']:.3f} |")


def main(argv=None, prog=None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="vit")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2], help="k: the last k blocks trained")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["full", "asi", "lora", "lora_asi"])
    p.add_argument("--level", type=float, default=0.9, help="ASI's HOSVD_eps level for its ranks")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.03, help="the lr without --sweep-lrs")
    p.add_argument("--sweep-lrs", type=float, nargs="*", default=[], help="lrs tried on the first seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget-mb", type=float, default=None)
    p.add_argument("--cache-dir", default=str(Path(".cache") / "cmp"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--out", default="compare.json", help="JSON rows (rewritten)")
    p.add_argument("--table-only", action="store_true", help="print the table of --out's rows, no training")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.table_only:
        print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
              f"{args.model}, {args.steps} steps", flush=True)
        t0 = time.perf_counter()
        measure(args)
        print(f"# wall {time.perf_counter() - t0:.0f} s", flush=True)
    summ = summary(json.loads(Path(args.out).read_text()), args.budget_mb)
    print_table(summ)
    Path(args.out).with_suffix(".summary.json").write_text(json.dumps(summ, indent=1))
    return 0
