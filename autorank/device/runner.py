"""The device runner's steps: set the allocator policy, build the model the plan names, load its
weights and a fresh head, open the data batch by batch, predict the process's peak memory and
refuse a plan that cannot fit, fine-tune (measuring the saved bytes on the first real step),
evaluate in batches, save, and print the measured peaks beside the predictions (torch only)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import torch

from autorank.cost import measure_saved_bytes, predict_peak_training_bytes
from autorank.cost.loss import logits_of, training_loss
from autorank.cost.process import ProcessPrediction
from autorank.device.checks import batch_refusal
from autorank.device.data import DataError, DeviceData, Split, open_data
from autorank.device.inputs import BadInput, check_labels, finetune_lr, load_model, load_plan, settings
from autorank.device.options import check_args, parse_args
from autorank.device.sgd import SGD
from autorank.device.sigint import SigintLatch
from autorank.device.memory import MB, PeakSampler, memory_allowed, read_status, set_allocator_policy
from autorank.device.status import report_phase
from autorank.plan import PlanError, apply_plan, check_choices, finetune_mode, save_base_weights

EXIT_NO_FIT = 3  # the predicted process peak is above the memory the process may use: refused
EXIT_OUT_OF_MEMORY = 4  # ran out of memory (an allocation failed, or killed by the kernel: guard.py)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def report_saved_bytes(measured: int, predicted: int, bs: int, shape, xshape) -> None:
    diff = 100 * (measured - predicted) / predicted if predicted else 0.0
    line = (f"saved activations per step (batch {bs}, measured on the first step): measured {measured:,} bytes, "
            f"predicted {predicted:,} bytes ({diff:+.2f}%)")
    if shape and list(xshape) != [int(v) for v in shape]:
        line += f" [the plan was costed for input {list(shape)}, this data gives {list(xshape)}]"
    print(line)
    if measured != predicted:
        print(f"warning: measured and predicted saved bytes differ by {measured - predicted:+,} bytes: "
              "the cost model does not describe this model/plan exactly", file=sys.stderr)


def train(model: torch.nn.Module, data: Split, opt, bs: int, epochs: int,
          on_first_step=None, max_steps: int | None = None) -> bool:
    """Plain SGD epochs over shuffled batches; False (after an error line) on a non-finite loss.
    A short last batch is dropped when there are at least `bs` samples: every step has the batch
    shape the plan's memory was predicted for, as in the search's trials. The first step's
    forward runs under saved-tensor hooks (no second forward): on_first_step(saved_bytes, x).
    max_steps: stop after that many steps in all (a quick check of the plan's memory). Ctrl-C
    raises KeyboardInterrupt, at the latest at the next step (SigintLatch)."""
    with SigintLatch() as latch:
        return _train(model, data, opt, bs, epochs, on_first_step, max_steps, latch)


def _train(model, data: Split, opt, bs: int, epochs: int, on_first_step, max_steps, latch: SigintLatch) -> bool:
    n = len(data)
    end = n - n % bs if n >= bs else n
    first, steps = True, 0
    for epoch in range(epochs):
        perm = torch.randperm(n)
        total, seen = 0.0, 0
        for i in range(0, end, bs):
            latch.check()
            x, y = data.batch(perm[i:i + bs])
            data.release()
            if first:
                out: list = []
                saved = measure_saved_bytes(lambda: out.append(model(x)) or out[0], model)
                loss = training_loss(out.pop(), y, data.kind)
                if on_first_step is not None:
                    on_first_step(saved.activation_bytes, x)
                first = False
            else:
                loss = training_loss(model(x), y, data.kind)
            if not torch.isfinite(loss):
                print(f"error: loss is {loss.item()} at epoch {epoch + 1}, step {i // bs + 1}: "
                      "try a smaller --lr", file=sys.stderr)
                return False
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
            del x, y, loss
            steps += 1
            if max_steps and steps >= max_steps:
                break
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / max(seen, 1):.4f}")
        if max_steps and steps >= max_steps:
            print(f"stopped after {steps} step(s) (--steps)")
            break
    return True


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Split, bs: int) -> tuple[float, float]:
    """Accuracy and mean loss over `data` in batches of `bs` (never the whole set at once)."""
    correct = count = 0
    loss_sum = 0.0
    for i in range(0, len(data), bs):
        x, y = data.batch(torch.arange(i, min(i + bs, len(data))))
        data.release()
        logits = logits_of(model(x))
        correct += int((logits.argmax(-1 if data.kind == "token" else 1) == y).sum())
        count += y.numel()
        loss_sum += float(training_loss(logits, y, data.kind)) * y.numel()
    return correct / count, loss_sum / count


def _prepare(a: argparse.Namespace):
    """Plan, data, model with the plan applied, batch size and the process prediction."""
    plan = load_plan(a.plan)
    ft = settings(plan)
    finetune_lr(plan, a.lr)  # refuses a learning rate SGD cannot use before any work
    shape = (ft.input_shape if ft is not None else None) or None
    try:
        data = open_data(a.data, shape)
    except DataError as e:
        raise BadInput(str(e)) from e
    print(f"data: {data.source}")
    base = finetune_mode(load_model(a, plan, keep_head=data.kind == "token"), bn_eval=True)
    bs = a.batch_size if a.batch_size is not None else (int(shape[0]) if shape else 32)
    if bs < 1:
        raise BadInput(f"the plan's input_shape {list(shape)} has batch {bs}: pass --batch-size N (N >= 1)")
    too_big = batch_refusal(bs, data.train, memory_allowed())  # before a batch is allocated
    if too_big:
        raise BadInput(too_big)
    try:
        check_choices(base, plan)  # every rank against its layer, before anything is built for it
    except ValueError as e:  # each message says what to do
        raise BadInput(str(e)) from e
    try:
        xb, _ = data.train.batch(torch.arange(bs) % len(data.train))
        data.train.release()
    except DataError as e:
        raise BadInput(str(e)) from e
    training, activation, source = _training_prediction(a, plan, base, xb, data.kind)
    check_labels(base, xb, {"y": data.train.labels, "y_val": data.val.labels if data.val else None})
    del xb
    weights = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in [*base.parameters(), *base.buffers()]}.values())
    try:
        model = apply_plan(base, plan)  # in place
    except PlanError as e:  # a plan that trains nothing
        raise BadInput(f"{e}: export a plan with at least one trained layer") from e
    except ValueError as e:  # layer names that do not fit the model built here
        raise BadInput(f"{e}; build the model the plan was made for (--model/--model-kwargs) "
                       "or export the plan again for this model") from e
    finetune_mode(model, bn_eval=True)
    ready = read_status()
    print(f"ready to train: RSS {ready['VmRSS'] / MB:.0f} MB (anonymous {ready['RssAnon'] / MB:.0f} MB, "
          f"file-backed {ready['RssFile'] / MB:.0f} MB); training peak {training / MB:.1f} MB ({source})")
    process = ProcessPrediction.from_ready(ready["VmRSS"], training, weights)
    return plan, data, model, bs, shape, activation, process


def _recorded(plan, shape, xshape) -> tuple[int, int] | None:
    """The search's own prediction in the plan file (training peak, saved activations), when it
    was made for this batch shape; None otherwise."""
    meta = plan.meta or {}
    peak, act = meta.get("predicted_peak_bytes"), meta.get("predicted_activation_bytes")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (peak, act))
    if not ok or not shape or [int(v) for v in shape] != list(xshape):
        return None
    return int(peak), int(act)


def _training_prediction(a, plan, base, xb, kind: str) -> tuple[int, int, str]:
    """(training peak bytes: tensors + kernel copies, saved activation bytes, where they come from).
    The plan file's figures when they were made for this batch (no tracing here: the meta-device
    trace imports about 70 MB of symbolic-shape machinery that would stay resident for the whole
    run), else predicted here."""
    ft = settings(plan)
    recorded = None if a.predict_here else _recorded(plan, ft.input_shape if ft else None, xb.shape)
    if recorded is not None:
        return recorded[0], recorded[1], "the plan file's prediction"
    try:  # on a meta-device shadow of the model: nothing of the batch's size is allocated
        t = predict_peak_training_bytes(base, xb, plan, optimizer="sgd", momentum=a.momentum, loss=kind)
    except ValueError as e:  # fingerprint or layer names do not fit the model built here
        raise BadInput(f"{e}; build the model the plan was made for (--model/--model-kwargs) "
                       "or export the plan again for this model") from e
    except RuntimeError as e:  # the data's shape does not fit the model
        raise BadInput(f"the model cannot run on the data (a batch has shape {list(xb.shape)}): {e}") from e
    return t.training_bytes, t.activation_bytes, "predicted here"


def _check_fits(process: ProcessPrediction, plan, force: bool) -> None:
    allowed = memory_allowed()
    planned = (plan.meta or {}).get("process_peak_bytes")
    print(f"predicted process peak {process.line()}"
          + (f"; the search predicted {planned / MB:.0f} MB for its device" if planned else ""))
    report_phase("ready", predicted_bytes=process.total_bytes, allowed=allowed)
    if allowed is None:
        print("memory check: cannot read the memory this process may use (no cgroup limit, no /proc/meminfo)")
        return
    limit, where = allowed
    if process.total_bytes <= limit:
        print(f"memory check: fits, {process.total_bytes / MB:.0f} MB of {limit / MB:.0f} MB ({where})")
        return
    msg = (f"the plan needs about {process.total_bytes / MB:.0f} MB at its peak but this process may use "
           f"{limit / MB:.0f} MB ({where}): export a plan for a smaller budget, free memory, or pass "
           "--ignore-memory-check to try anyway")
    if not force:
        raise NoFit(msg)
    print(f"warning: {msg}", file=sys.stderr)


class NoFit(Exception):
    """The plan's predicted process peak is above the memory the process may use (exit 3)."""


def run(a: argparse.Namespace) -> int:
    check_args(a)
    policy = set_allocator_policy()  # before the model and the data take memory
    torch.manual_seed(0)
    with PeakSampler() as mem:
        plan, data, model, bs, shape, activation, process = _prepare(a)
        print(policy)
        _check_fits(process, plan, a.ignore_memory_check)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise BadInput("the plan trains no parameter: export a plan with at least one trained layer")
        lr = finetune_lr(plan, a.lr)
        opt = SGD(params, lr=lr, momentum=a.momentum)  # not torch.optim's: see autorank/device/sgd.py
        print(f"fine-tuning {sum(p.numel() for p in params):,} parameters: SGD lr {lr:g}, momentum {a.momentum:g}, "
              f"batch {bs}, {a.epochs} epoch(s)")
        report_phase("training", predicted_bytes=process.total_bytes)
        t0 = time.perf_counter()
        ok = train(model, data.train, opt, bs, a.epochs,
                   lambda saved, x: report_saved_bytes(saved, activation, bs, shape, x.shape), a.steps)
        if not ok:
            return 1
        print(f"training took {time.perf_counter() - t0:.1f} s")
        train_peaks = dataclasses.replace(mem.peaks)  # a copy: the sampler goes on through evaluation
        _finish(a, model, data, bs)
    print(f"process peak while training: {train_peaks.line()}; predicted {process.total_bytes / MB:.0f} MB "
          f"({100 * (train_peaks.hwm - process.total_bytes) / process.total_bytes:+.1f}%)")
    return 0


def _finish(a: argparse.Namespace, model: torch.nn.Module, data: DeviceData, bs: int) -> None:
    if data.val is not None:
        model.eval()
        acc, val_loss = evaluate(model, data.val, bs)
        finetune_mode(model, bn_eval=True)
        what = "next-token accuracy" if data.kind == "token" else "accuracy"
        extra = f", loss {val_loss:.4f}" + (f", perplexity {math.exp(val_loss):.3f}" if data.kind == "token" else "")
        print(f"validation {what} {acc:.4f}{extra}")
    if a.out:
        try:
            path = save_base_weights(model, a.out)  # plan removed for the save, keys of the plain model
        except OSError as e:
            raise BadInput(f"cannot write {a.out}: {e}") from e
        print(f"saved the fine-tuned base-model weights (no plan; load with "
              f"autorank.plan.load_base_weights or model.load_state_dict) to {path}")


def main(argv=None) -> int:
    """Exit status: 0 done, 1 non-finite loss, 2 bad input, 3 the plan cannot fit in the memory this
    process may use (refused before training), 4 out of memory while running."""
    a = parse_args(argv)  # argparse reports its own usage errors (exit 2)
    try:
        return run(a)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NoFit as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_FIT
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C): nothing was saved", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        status = read_status()
        print(f"error: out of memory ({type(e).__name__}: {str(e).splitlines()[0][:160]}) with "
              f"{status['VmRSS'] / MB:.0f} MB resident: export a plan for a smaller budget", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
