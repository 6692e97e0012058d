"""The device runner's steps: build the model the plan names, load its weights and a fresh head,
check the predicted saved bytes against a measurement, fine-tune, evaluate, save (torch only)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from autorank.cost import measure_saved_bytes, predict_saved_bytes
from autorank.cost.loss import logits_of, training_loss
from autorank.device.inputs import (
    DEFAULT_LR,
    BadInput,
    build_model,
    check_labels,
    finetune_lr,
    load_data,
    load_plan,
    loss_kind,
    load_weights,
    settings,
)
from autorank.models import classifier_name, replace_head
from autorank.plan import Plan, PlanError, apply_plan, check_fingerprint, finetune_mode, save_base_weights


def _model_kwargs(text: str | None) -> dict | None:
    try:
        kwargs = json.loads(text) if text else None
    except json.JSONDecodeError as e:
        raise BadInput(f"--model-kwargs is not valid JSON: {e}") from e
    if kwargs is not None and not isinstance(kwargs, dict):
        raise BadInput("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return kwargs


def load_model(a: argparse.Namespace, plan: Plan, keep_head: bool = False) -> torch.nn.Module:
    """The plan's model with the checkpoint's weights and, unless --keep-head (or `keep_head`: a
    language model's output layer is its vocabulary, which fine-tuning keeps) or the checkpoint's
    head did not fit, a fresh head seeded as the search's (autorank.models.replace_head)."""
    model = build_model(plan, a.model, _model_kwargs(a.model_kwargs))
    if plan.fingerprint is not None:
        try:
            check_fingerprint(plan.fingerprint, model)
        except ValueError as e:
            raise BadInput(f"{e}; build the model the plan was made for (--model/--model-kwargs) "
                           "or export the plan again for this model") from e
    skipped = load_weights(model, a.checkpoint)
    if skipped:
        print(f"classifier head of another shape in the checkpoint, kept fresh on purpose: {', '.join(skipped)}")
    elif keep_head:
        print("token data: the checkpoint's output layer kept (same vocabulary), as the search trained it")
    elif not a.keep_head:
        # The search fine-tuned a fresh head (the checkpoint's head belongs to the upstream task).
        ft = settings(plan)
        seed = a.seed if a.seed is not None else (ft.seed if ft is not None else 0)
        head = classifier_name(model)
        replace_head(model, model.get_submodule(head).out_features, seed=seed)
        print(f"classifier head {head}: fresh (seed {seed}); --keep-head keeps the checkpoint's")
    return model


def report_saved_bytes(model: torch.nn.Module, xb: torch.Tensor, predicted: int, shape) -> None:
    """One forward of the planned model under saved-tensor hooks, printed against the prediction."""
    measured = measure_saved_bytes(lambda: model(xb), model).activation_bytes
    diff = 100 * (measured - predicted) / predicted if predicted else 0.0
    line = (f"saved activations per step (batch {len(xb)}): measured {measured:,} bytes, "
            f"predicted {predicted:,} bytes ({diff:+.2f}%)")
    if shape and list(xb.shape) != [int(v) for v in shape]:
        line += f" [the plan was costed for input {list(shape)}, this data gives {list(xb.shape)}]"
    print(line)
    if measured != predicted:
        print(f"warning: measured and predicted saved bytes differ by {measured - predicted:+,} bytes: "
              "the cost model does not describe this model/plan exactly", file=sys.stderr)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
          bs: int, epochs: int, loss_kind: str = "class") -> bool:
    """Plain SGD epochs over shuffled batches; False (after an error line) on a non-finite loss.
    A short last batch is dropped when there are at least `bs` samples: every step has the batch
    shape the plan's memory was predicted for, as in the search's trials.
    loss_kind "token": next-token cross-entropy over every position (autorank.cost.loss)."""
    end = len(x) - len(x) % bs if len(x) >= bs else len(x)
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        total, n = 0.0, 0
        for i in range(0, end, bs):
            idx = perm[i:i + bs]
            loss = training_loss(model(x[idx]), y[idx], loss_kind)
            if not torch.isfinite(loss):
                print(f"error: loss is {loss.item()} at epoch {epoch + 1}, step {i // bs + 1}: "
                      "try a smaller --lr", file=sys.stderr)
                return False
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(idx), n + len(idx)
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / n:.4f}")
    return True


def check_args(a: argparse.Namespace) -> None:
    """The numbers and paths on the command line, before any file is read: BadInput naming the
    option, the value and what is allowed."""
    if a.batch_size is not None and a.batch_size < 1:
        raise BadInput(f"--batch-size must be >= 1, got {a.batch_size} (leave it out for the plan's batch)")
    if a.epochs < 0:
        raise BadInput(f"--epochs must be >= 0 (0: load, check and evaluate without training), got {a.epochs}")
    if a.lr is not None and not (math.isfinite(a.lr) and a.lr > 0):
        raise BadInput(f"--lr must be a finite number > 0, got {a.lr} (leave it out for the plan's lr)")
    if not (math.isfinite(a.momentum) and 0 <= a.momentum < 1):
        raise BadInput(f"--momentum must lie in [0, 1), got {a.momentum}")
    for name in ("plan", "checkpoint", "data"):
        path = getattr(a, name)
        if Path(path).is_dir():
            raise BadInput(f"{name} {path} is a directory: pass the {name} file itself")
    if a.out and Path(a.out).is_dir():
        raise BadInput(f"--out {a.out} is a directory: pass the file to write, e.g. {Path(a.out) / 'weights.pt'}")


def run(a: argparse.Namespace) -> int:
    check_args(a)
    torch.manual_seed(0)
    plan = load_plan(a.plan)
    x, y, xv, yv = load_data(a.data)
    kind = loss_kind(x)
    model = load_model(a, plan, keep_head=kind == "token")

    # The fine-tuning mode the search costed: train mode (dropout live), BN in eval mode.
    base = finetune_mode(model, bn_eval=True)
    ft = settings(plan)
    shape = (ft.input_shape if ft is not None else None) or None
    bs = a.batch_size if a.batch_size is not None else (int(shape[0]) if shape else 32)
    if bs < 1:
        raise BadInput(f"the plan's input_shape {list(shape)} has batch {bs}: pass --batch-size N (N >= 1)")
    xb = x[torch.arange(bs) % len(x)]  # one batch at the costed size (fresh storage: a view would count all of x)
    try:
        predicted = predict_saved_bytes(base, xb, plan).activation_bytes
    except ValueError as e:  # fingerprint or layer names do not fit the model built here
        raise BadInput(f"{e}; build the model the plan was made for (--model/--model-kwargs) "
                       "or export the plan again for this model") from e
    except RuntimeError as e:  # the data's shape does not fit the model
        raise BadInput(f"the model cannot run on the data (x has shape {list(x.shape)}): {e}") from e
    check_labels(model, xb, {"y": y, "y_val": yv})
    try:
        model = apply_plan(base, plan)  # in place; checked above on a copy
    except PlanError as e:  # a plan that trains nothing
        raise BadInput(f"{e}: export a plan with at least one trained layer") from e
    finetune_mode(model, bn_eval=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise BadInput("the plan trains no parameter: export a plan with at least one trained layer")
    report_saved_bytes(model, xb, predicted, shape)

    lr = finetune_lr(plan, a.lr)
    opt = torch.optim.SGD(params, lr=lr, momentum=a.momentum)
    print(f"fine-tuning {sum(p.numel() for p in params):,} parameters: SGD lr {lr:g}, momentum {a.momentum:g}, "
          f"batch {bs}, {a.epochs} epoch(s)")
    t0 = time.perf_counter()
    if not train(model, x, y, opt, bs, a.epochs, kind):
        return 1
    print(f"training took {time.perf_counter() - t0:.1f} s")
    if xv is not None:
        model.eval()
        with torch.no_grad():
            logits = logits_of(model(xv))
            acc = float((logits.argmax(-1 if kind == "token" else 1) == yv).float().mean())
            val_loss = float(training_loss(logits, yv, kind))
        finetune_mode(model, bn_eval=True)
        what = "next-token accuracy" if kind == "token" else "accuracy"
        extra = f", loss {val_loss:.4f}" + (f", perplexity {math.exp(val_loss):.3f}" if kind == "token" else "")
        print(f"validation {what} {acc:.4f}{extra}")
    if a.out:
        try:
            path = save_base_weights(model, a.out)  # plan removed for the save, keys of the plain model
        except OSError as e:
            raise BadInput(f"cannot write {a.out}: {e}") from e
        print(f"saved the fine-tuned base-model weights (no plan; load with "
              f"autorank.plan.load_base_weights or model.load_state_dict) to {path}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="autorank-device",
                                 description="Fine-tune with an exported plan on the device, with torch alone.")
    ap.add_argument("plan")
    ap.add_argument("checkpoint")
    ap.add_argument("data")
    ap.add_argument("--epochs", type=int, default=1)
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
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)  # argparse reports its own usage errors (exit 2)
    try:
        return run(a)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
