"""Compare predict_peak_training_bytes with a CUDA training step's memory, split into the model's
tensors and cuDNN's workspace.

    python scripts/check_peak_cuda.py [--batch 32] [--size 128] [--optimizer sgd]

For each model and plan: one warm-up step (so the optimizer state exists), then one full step
(forward, backward, optimizer.step, zero_grad), everything resident (weights, optimizer state,
batch) included, measured three ways:
- tensors: the live bytes of the step's tensors (autorank.cost.live.measure_peak_training, the
  measurement scripts/check_peak_cpu.py makes on the CPU): what the predictor models;
- allocated: torch.cuda.max_memory_allocated, which adds cuDNN's workspaces (not modelled: they
  depend on the algorithm cuDNN picks) and the caching allocator's rounding (512-byte blocks);
- no cuDNN: max_memory_allocated with torch.backends.cudnn.enabled=False (PyTorch's own CUDA
  convolutions: an im2col buffer of one sample's columns for k x k convs, much smaller).
So allocated - tensors is the workspace and rounding the prediction leaves out. Also the saved
bytes measured on the GPU next to the prediction. Prints a table; `check()` returns rows.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from autorank.cost import measure_saved_bytes, predict_peak_training_bytes, predict_saved_bytes
from autorank.cost.live import make_optimizer, measure_peak_training
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


def measure_peak(model, x, y, optimizer="sgd", momentum=0.9, cudnn=True) -> int:
    """torch.cuda.max_memory_allocated over one step after a warm-up (cuDNN on or off)."""
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, momentum)

    def step():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.backends.cudnn.flags(enabled=cudnn):
        step()  # warm-up: optimizer state, cuDNN autotuning, ASI warm-start state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del opt
    return peak


def check(batch=32, size=128, optimizer="sgd", names=None) -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("check_peak_cuda needs a CUDA device")
    dev = torch.device("cuda")
    rows = []
    ctors = models()
    for name in names or list(ctors):
        for plan_name, plan in plans(ctors[name]()).items():
            torch.manual_seed(0)
            model = ctors[name]().to(dev).eval()
            x = torch.randn(batch, 3, size, size, device=dev)
            y = torch.randint(0, 10, (batch,), device=dev)
            pred = predict_peak_training_bytes(model, x, plan, optimizer=optimizer)
            pred_saved = predict_saved_bytes(model, x, plan).activation_bytes
            if plan is not None:
                apply_plan(model, plan)
            meas_saved = measure_saved_bytes(lambda: model(x), model).activation_bytes
            tensors = measure_peak_training(model, x, y, optimizer).peak_bytes
            peaks = {}
            for cudnn in (True, False):
                torch.cuda.empty_cache()
                peaks[cudnn] = measure_peak(model, x, y, optimizer, cudnn=cudnn)
            rows.append({"model": name, "plan": plan_name, "predicted_bytes": pred.total_bytes,
                         "tensor_bytes": tensors, "measured_bytes": peaks[True], "nocudnn_bytes": peaks[False],
                         "ratio": pred.total_bytes / tensors, "predicted_saved": pred_saved,
                         "measured_saved": meas_saved, "transient_bytes": pred.transient_bytes})
            del model, x, y
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    ap.add_argument("--models", nargs="*", default=None, help="default: all of models()")
    args = ap.parse_args()
    rows = check(args.batch, args.size, args.optimizer, args.models)
    mb = 2**20
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
          f"batch {args.batch}, {args.size} px, {args.optimizer}")
    print(f"{'model':14} {'plan':16} {'predicted':>10} {'tensors':>10} {'ratio':>6} {'allocated':>10} "
          f"{'no cuDNN':>10} {'workspace':>10} {'saved pred':>10} {'saved meas':>10}  (MiB)")
    for r in rows:
        print(f"{r['model']:14} {r['plan']:16} {r['predicted_bytes'] / mb:10.2f} {r['tensor_bytes'] / mb:10.2f} "
              f"{r['ratio']:6.2f} {r['measured_bytes'] / mb:10.2f} {r['nocudnn_bytes'] / mb:10.2f} "
              f"{(r['measured_bytes'] - r['tensor_bytes']) / mb:10.2f} "
              f"{r['predicted_saved'] / mb:10.2f} {r['measured_saved'] / mb:10.2f}")


if __name__ == "__main__":
    main()
