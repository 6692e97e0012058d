"""Predicted peak training memory against a real training step, on the CPU or a CUDA device.

    autorank-bench peak [--device cpu|cuda] [--batch 16] [--size 64] [--models mobilenet_v2 resnet18]

For each model (torchvision's MobileNetV2 and ResNet18, autorank.models.mcunet_like; 10 classes,
weights=None, eval mode) and each plan (everything trained, the last 4 layers plainly with and
without lean companions, ASI on the last 8, the first 4 layers plainly): one warm-up step, then
the peak of one full step (forward, loss, backward, optimizer.step, zero_grad), everything
resident included, against predict_peak_training_bytes.

--device cpu (the default): the live tensor bytes (autorank.cost.live.measure_peak_training), where
the peak was (forward / backward / step) and the time of one prediction (the meta shadow built).
--allocator adds the CPU allocator's own peak (torch.profiler's allocation events, every allocation
a kernel makes included): the gap to the live tensors is the kernels' scratch (oneDNN's copies on
x86), which "with kernels" (PeakMemory.training_bytes) counts while each convolution runs.

--device cuda: three measurements: `tensors` (the live tensor bytes on the GPU, what the predictor
models), `allocated` (torch.cuda.max_memory_allocated: cuDNN's workspaces and the caching
allocator's rounding added, neither modelled) and `no cuDNN` (the same with cuDNN off), and the
saved bytes measured on the GPU beside the prediction.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from autorank.cost import measure_saved_bytes, predict_peak_training_bytes, predict_saved_bytes
from autorank.cost.live import allocator_peak_bytes, make_optimizer, measure_peak_training
from autorank.plan import Choice, Plan, apply_plan, candidate_layers

MIB = 2**20


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


def _cases(names, batch, size, device):
    """(model name, plan name, plan, model, x, y) for every model and plan, seeded alike."""
    ctors = models()
    unknown = sorted(set(names or ()) - set(ctors))
    if unknown:
        raise SystemExit(f"autorank-bench peak: unknown model(s) {', '.join(unknown)}: use {', '.join(ctors)}")
    for name in names or list(ctors):
        for plan_name, plan in plans(ctors[name]()).items():
            torch.manual_seed(0)
            model = ctors[name]().to(device).eval()
            x = torch.randn(batch, 3, size, size, device=device)
            y = torch.randint(0, 10, (batch,), device=device)
            yield name, plan_name, plan, model, x, y


def check_cpu(batch=16, size=64, optimizer="sgd", names=None, allocator=False) -> list[dict]:
    rows = []
    for name, plan_name, plan, model, x, y in _cases(names, batch, size, "cpu"):
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


def cuda_allocated(model, x, y, optimizer="sgd", momentum=0.9, cudnn=True) -> int:
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


def check_cuda(batch=32, size=128, optimizer="sgd", names=None) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("autorank-bench peak: --device cuda needs a CUDA device (torch.cuda.is_available() is "
                         "False): run it on a machine with one, or use --device cpu")
    rows = []
    for name, plan_name, plan, model, x, y in _cases(names, batch, size, "cuda"):
        pred = predict_peak_training_bytes(model, x, plan, optimizer=optimizer)
        pred_saved = predict_saved_bytes(model, x, plan).activation_bytes
        if plan is not None:
            apply_plan(model, plan)
        meas_saved = measure_saved_bytes(lambda: model(x), model).activation_bytes
        tensors = measure_peak_training(model, x, y, optimizer).peak_bytes
        peaks = {}
        for cudnn in (True, False):
            torch.cuda.empty_cache()
            peaks[cudnn] = cuda_allocated(model, x, y, optimizer, cudnn=cudnn)
        rows.append({"model": name, "plan": plan_name, "predicted_bytes": pred.total_bytes,
                     "tensor_bytes": tensors, "measured_bytes": peaks[True], "nocudnn_bytes": peaks[False],
                     "ratio": pred.total_bytes / tensors, "predicted_saved": pred_saved,
                     "measured_saved": meas_saved, "transient_bytes": pred.transient_bytes})
        del model, x, y
        torch.cuda.empty_cache()
    return rows


def print_cpu(rows, args) -> None:
    print(f"CPU, torch {torch.__version__}; batch {args.batch}, {args.size} px, {args.optimizer}")
    print(f"{'model':14} {'plan':16} {'predicted MiB':>14} {'measured MiB':>13} {'ratio':>6} {'phase':>9} "
          f"{'fwd meas MiB':>13} {'saved MiB':>10} {'predict ms':>10}"
          + (" allocator MiB  with kernels MiB" if args.allocator else ""))
    for r in rows:
        print(f"{r['model']:14} {r['plan']:16} {r['predicted_bytes'] / MIB:14.2f} {r['measured_bytes'] / MIB:13.2f} "
              f"{r['ratio']:6.2f} {r['phase']:>9} {r['measured_forward_bytes'] / MIB:13.2f} "
              f"{r['predicted_saved'] / MIB:10.2f} {1000 * r['predict_s']:10.1f}"
              + (f" {r['allocator_bytes'] / MIB:13.2f} {r['training_bytes'] / MIB:16.2f}" if args.allocator else ""))


def print_cuda(rows, args) -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
          f"batch {args.batch}, {args.size} px, {args.optimizer}")
    print(f"{'model':14} {'plan':16} {'predicted':>10} {'tensors':>10} {'ratio':>6} {'allocated':>10} "
          f"{'no cuDNN':>10} {'workspace':>10} {'saved pred':>10} {'saved meas':>10}  (MiB)")
    for r in rows:
        print(f"{r['model']:14} {r['plan']:16} {r['predicted_bytes'] / MIB:10.2f} {r['tensor_bytes'] / MIB:10.2f} "
              f"{r['ratio']:6.2f} {r['measured_bytes'] / MIB:10.2f} {r['nocudnn_bytes'] / MIB:10.2f} "
              f"{(r['measured_bytes'] - r['tensor_bytes']) / MIB:10.2f} "
              f"{r['predicted_saved'] / MIB:10.2f} {r['measured_saved'] / MIB:10.2f}")


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 16 on the CPU, 32 on CUDA")
    ap.add_argument("--size", type=int, default=None, help="input px; default: 64 on the CPU, 128 on CUDA")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    ap.add_argument("--models", nargs="*", default=None, help="default: mobilenet_v2 resnet18 mcunet_like")
    ap.add_argument("--allocator", action="store_true", help="CPU: also the allocator's peak (torch.profiler)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.batch = args.batch or (32 if cuda else 16)
    args.size = args.size or (128 if cuda else 64)
    if cuda:
        print_cuda(check_cuda(args.batch, args.size, args.optimizer, args.models), args)
    else:
        print_cpu(check_cpu(args.batch, args.size, args.optimizer, args.models, args.allocator), args)
    return 0
