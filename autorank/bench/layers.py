"""Layer benchmark: plain vs ASI vs HOSVD_eps vs activation checkpointing, side by side.

For conv / linear shapes of MobileNetV2, an MCUNet-like network and ResNet18 (last blocks, the
ones a fine-tuning plan trains) at the given input sizes: forward+backward time (median of
--repeats runs, ratio to plain), measured saved activation bytes, and FLOPs of one step. ASI runs
at the ranks HOSVD_eps(0.8) picks on the same input (warm-started: one step before timing).
Inputs are synthetic activations (ReLU of a low-Tucker-rank tensor plus noise): no pretrained
weights exist offline, so the ranks are indicative, the timings of the kernels are not.

    autorank-bench layers                       # CPU, 224 and 96 px, batch 32
    autorank-bench layers --device cuda --batch 128 --out docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from autorank.shortcut import ASIConv2d, ASILinear, HOSVDConv2d, HOSVDLinear, hosvd_ranks, tucker_reconstruct
from autorank.io import atomic_write

try:  # the project's cost model (measured bytes, corrected FLOP counter)
    from autorank.cost import flop_counter, measure_saved_bytes

    def saved_activation_bytes(fn, module) -> int:
        return measure_saved_bytes(fn, module).activation_bytes
except ImportError:  # pragma: no cover - standalone fallback
    from torch.utils.flop_counter import FlopCounterMode

    def flop_counter():
        return FlopCounterMode(display=False)

    def saved_activation_bytes(fn, module) -> int:
        params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        del out
        return sum(s.nbytes() for s in seen.values())


def layer_shapes(px: int):
    """(net, name, kind, module kwargs, input (C, H, W) or (features,)) at input size px."""
    s32, s16, s8 = max(px // 32, 1), max(px // 16, 1), max(px // 8, 1)
    conv = "conv"
    return [
        ("mobilenet_v2", "features.17.conv.0 1x1", conv, dict(in_channels=160, out_channels=960, kernel_size=1), (160, s32, s32)),
        ("mobilenet_v2", "features.17.conv.1 dw3x3", conv, dict(in_channels=960, out_channels=960, kernel_size=3, padding=1, groups=960), (960, s32, s32)),
        ("mobilenet_v2", "features.17.conv.2 1x1", conv, dict(in_channels=960, out_channels=320, kernel_size=1), (960, s32, s32)),
        ("mobilenet_v2", "features.18 1x1", conv, dict(in_channels=320, out_channels=1280, kernel_size=1), (320, s32, s32)),
        ("mobilenet_v2", "classifier.1", "linear", dict(in_features=1280, out_features=1000), (1280,)),
        ("mcunet_like", "block 1x1 expand", conv, dict(in_channels=96, out_channels=480, kernel_size=1), (96, s16, s16)),
        ("mcunet_like", "block dw5x5", conv, dict(in_channels=480, out_channels=480, kernel_size=5, padding=2, groups=480), (480, s16, s16)),
        ("mcunet_like", "block 1x1 project", conv, dict(in_channels=480, out_channels=160, kernel_size=1), (480, s16, s16)),
        ("resnet18", "layer3.1.conv2 3x3", conv, dict(in_channels=256, out_channels=256, kernel_size=3, padding=1), (256, s16, s16)),
        ("resnet18", "layer4.0.conv1 3x3 s2", conv, dict(in_channels=256, out_channels=512, kernel_size=3, stride=2, padding=1), (256, s16, s16)),
        ("resnet18", "layer4.1.conv2 3x3", conv, dict(in_channels=512, out_channels=512, kernel_size=3, padding=1), (512, s32, s32)),
        ("resnet18", "layer2.1.conv2 3x3", conv, dict(in_channels=128, out_channels=128, kernel_size=3, padding=1), (128, s8, s8)),
        ("resnet18", "fc", "linear", dict(in_features=512, out_features=1000), (512,)),
    ]


def synthetic_activation(shape, device, gen) -> torch.Tensor:
    """ReLU(low-Tucker-rank tensor + noise): a decaying spectrum on every mode."""
    ranks = [max(1, s // 4) for s in shape]
    us = [torch.randn(s, r, generator=gen) for s, r in zip(shape, ranks)]
    x = tucker_reconstruct(torch.randn(ranks, generator=gen), us)
    x = x / x.std() + 0.3 * torch.randn(shape, generator=gen)
    return torch.relu(x).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(layer, x):
    xx = x.detach().requires_grad_(True)
    y = layer(xx)
    y.backward(torch.ones_like(y))
    return y


def time_step(layer, x, repeats, device) -> float:
    step(layer, x)  # warm-up (and one warm-start step for ASI)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step(layer, x)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Checkpointed(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base_layer = base

    def forward(self, x):
        return checkpoint(self.base_layer, x, use_reentrant=False)


def flops_of(layer, x) -> int:
    with flop_counter() as counter:
        step(layer, x)
    return int(counter.get_total_flops())


def predicted_bytes(base, x, ranks, kind):
    """The cost model's prediction (autorank.cost.predict_saved_bytes) for plain and ASI, to put
    beside the measurement; None without the project's cost model."""
    try:
        from autorank.cost import predict_saved_bytes
        from autorank.plan import Choice, Plan
    except ImportError:  # pragma: no cover - standalone fallback
        return None
    model = nn.Sequential(base)
    xx = x.detach().requires_grad_(True)
    return {m: predict_saved_bytes(model, xx, Plan({"0": c}, lean=False)).activation_bytes
            for m, c in (("plain", Choice.full()), ("asi", Choice.asi(ranks)))}


def bench(px, batch, device, repeats, eps):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for net, name, kind, kwargs, in_shape in layer_shapes(px):
        torch.manual_seed(0)
        base = (nn.Conv2d if kind == "conv" else nn.Linear)(**kwargs).to(device)
        x = synthetic_activation((batch, *in_shape), device, gen)
        ranks = hosvd_ranks(x, eps)
        methods = {
            "plain": base,
            "asi": (ASIConv2d if kind == "conv" else ASILinear)(base, ranks),
            f"hosvd{eps}": (HOSVDConv2d if kind == "conv" else HOSVDLinear)(base, eps),
            "checkpoint": Checkpointed(base),
        }
        res = {}
        for m, layer in methods.items():
            t = time_step(layer, x, repeats, device)
            nbytes = saved_activation_bytes(lambda: layer(x.detach().requires_grad_(True)), layer)
            res[m] = (t, nbytes, flops_of(layer, x))
        res["predicted"] = predicted_bytes(base, x, ranks, kind)
        rows.append((net, name, tuple(x.shape), ranks, res))
        base.zero_grad(set_to_none=True)
        print(f"  done {net} {name} {px}px", file=sys.stderr, flush=True)
    return rows


def markdown(rows, methods, header) -> str:
    out = [header, "",
           "| net | layer | input | ASI ranks | " + " | ".join(f"{m} ms (x plain)" for m in methods)
           + " | " + " | ".join(f"{m} saved MiB" for m in methods) + " | "
           + " | ".join(f"{m} GFLOP" for m in methods) + " | predicted = measured (plain, asi) |",
           "|" + "---|" * (5 + 3 * len(methods))]
    for net, name, shape, ranks, res in rows:
        tp = res["plain"][0]
        times = " | ".join(f"{res[m][0] * 1e3:.1f} ({res[m][0] / tp:.2f}x)" for m in methods)
        mem = " | ".join(f"{res[m][1] / 2**20:.3f}" for m in methods)
        fl = " | ".join(f"{res[m][2] / 1e9:.3f}" for m in methods)
        pred = res.get("predicted")
        check = "n/a" if pred is None else ", ".join(
            "yes" if pred[m] == res[m][1] else f"no ({pred[m]} vs {res[m][1]} B)" for m in ("plain", "asi"))
        out.append(f"| {net} | {name} | {'x'.join(map(str, shape))} | {ranks} | {times} | {mem} | {fl} | {check} |")
    return "\n".join(out)


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 96])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eps", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    parts = [f"# Layer benchmark ({dev_name}, batch {args.batch}, torch {torch.__version__})", "",
             f"Forward+backward (input requires grad), median of {args.repeats}; ASI at HOSVD_eps({args.eps}) "
             "ranks of the same input; saved bytes measured with saved_tensors_hooks (parameters apart); "
             "FLOPs from the corrected FlopCounterMode."]
    methods = ["plain", "asi", f"hosvd{args.eps}", "checkpoint"]
    for px in args.sizes:
        rows = bench(px, args.batch, device, args.repeats, args.eps)
        parts += ["", markdown(rows, methods, f"## {px} px")]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.out:
        atomic_write(args.out, lambda tmp: tmp.write_text(text))  # never a half-written table
