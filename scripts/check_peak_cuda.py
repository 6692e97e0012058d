"""Compare predict_peak_training_bytes with torch.cuda.max_memory_allocated (CUDA only).

    python scripts/check_peak_cuda.py [--batch 32] [--size 128]

For each model and plan: one warm-up step (so the optimizer state exists), then the peak of one
full step (forward, backward, optimizer.step, zero_grad) measured from a reset of the peak
statistics, everything resident (weights, optimizer state, batch) included. Also prints the
saved bytes measured on the GPU next to the prediction. Prints a table; `check()` returns rows.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from autorank.cost import measure_saved_bytes, predict_peak_training_bytes, predict_saved_bytes
from autorank.plan import Choice, Plan, apply_plan, candidate_layers


def plans(model) -> dict:
    """The plans of the table: none (everything trains), the last 4 layers (plain or lean), ASI on
    the last 8, and the first 4 layers trained (the gradient path runs through the whole net)."""
    c = candidate_layers(model)
    return {
        "plain": None,
        "full_last4": Plan({n: Choice.full() for n in c[-4:]}, lean=False),
        "full_last4_lean": Plan({n: Choice.full() for n in c[-4:]}),
        "asi_last8_lean": Plan({n: Choice.asi([4, 16, 4, 4]) for n in c[-8:-1]} | {c[-1]: Choice.full()}),
        "full_first4": Plan({n: Choice.full() for n in c[:4]}, lean=False),
    }


def models() -> dict:
    """name -> a constructor (10 classes, weights=None). mcunet_like comes from autorank.models."""
    import torchvision

    def mcunet_like():
        from autorank.models import mcunet_like

        return mcunet_like(num_classes=10)

    return {
        "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10),
        "resnet18": lambda: torchvision.models.resnet18(weights=None, num_classes=10),
        "mcunet_like": mcunet_like,
    }


def measure_peak(model, x, y, optimizer="sgd", momentum=0.9) -> int:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=1e-3, momentum=momentum) if optimizer == "sgd"
           else torch.optim.Adam(params, lr=1e-4))

    def step():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, cuDNN autotuning, ASI warm-start state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def check(batch=32, size=128, optimizer="sgd") -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("check_peak_cuda needs a CUDA device")
    dev = torch.device("cuda")
    rows = []
    for name, ctor in _models().items():
        for plan_name, plan in _plans(ctor()).items():
            torch.manual_seed(0)
            model = ctor().to(dev).eval()
            x = torch.randn(batch, 3, size, size, device=dev)
            y = torch.randint(0, 10, (batch,), device=dev)
            pred = predict_peak_training_bytes(model, x, plan, optimizer=optimizer)
            pred_saved = predict_saved_bytes(model, x, plan).activation_bytes
            if plan is not None:
                apply_plan(model, plan)
            meas_saved = measure_saved_bytes(lambda: model(x), model).activation_bytes
            torch.cuda.empty_cache()
            peak = measure_peak(model, x, y, optimizer)
            rows.append({"model": name, "plan": plan_name, "predicted_bytes": pred.total_bytes,
                         "measured_bytes": peak, "ratio": pred.total_bytes / peak,
                         "predicted_saved": pred_saved, "measured_saved": meas_saved,
                         "transient_bytes": pred.transient_bytes})
            del model, x, y
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    args = ap.parse_args()
    rows = check(args.batch, args.size, args.optimizer)
    mb = 2**20
    print(f"{'model':14} {'plan':16} {'predicted MiB':>14} {'measured MiB':>13} {'ratio':>6} "
          f"{'saved pred MiB':>15} {'saved meas MiB':>15}")
    for r in rows:
        print(f"{r['model']:14} {r['plan']:16} {r['predicted_bytes'] / mb:14.2f} {r['measured_bytes'] / mb:13.2f} "
              f"{r['ratio']:6.2f} {r['predicted_saved'] / mb:15.2f} {r['measured_saved'] / mb:15.2f}")


if __name__ == "__main__":
    main()
