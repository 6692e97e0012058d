"""Transformer linear layers: plain vs ASI vs LoRA vs LoRA + ASI, per layer.

For B x L x D inputs (batch, sequence length, width) and the linear layers of a transformer
block (an attention projection D -> D, the MLP's up projection D -> 4D): forward+backward time
(median of --repeats, the input requiring grad as inside a trained region), the activation bytes
autograd saves (measured with saved_tensors_hooks, parameters apart), the cost model's prediction
of them, and the FLOPs of one step (the corrected FlopCounterMode). Methods:

  plain       the weight trains: saves the whole input
  asi         ASI at HOSVD_eps(--eps) ranks of the input, on every mode
  asi:b       the same ranks with the batch mode kept whole (the keep-batch variant)
  lora        LoRA at rank --lora-rank, the weight frozen: A saves the whole input
  lora+asi:b  LoRA whose A keeps its input at the asi:b ranks

Inputs are synthetic activations (a low-Tucker-rank tensor plus noise): nothing pretrained exists
offline, so the ranks are indicative; the kernels' timings are not.

    autorank-bench transformer-layers                   # B=8, L in {128, 512}, D in {128, 256}
    autorank-bench transformer-layers --repeats 3 --out /tmp/t.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch import nn

from autorank.cost import flop_counter, measure_saved_bytes, predict_saved_bytes
from autorank.plan import Choice, Plan
from autorank.shortcut import ASILinear, LoRALinear, hosvd_ranks, tucker_reconstruct
from autorank.io import atomic_write


def synthetic_activation(shape, gen) -> torch.Tensor:
    """A low-Tucker-rank tensor (a quarter of each mode) plus noise: a decaying spectrum per mode."""
    ranks = [max(1, s // 4) for s in shape]
    us = [torch.randn(s, r, generator=gen) for s, r in zip(shape, ranks)]
    x = tucker_reconstruct(torch.randn(ranks, generator=gen), us)
    return x / x.std() + 0.3 * torch.randn(shape, generator=gen)


def step(layer, x):
    y = layer(x.detach().requires_grad_(True))
    y.backward(torch.ones_like(y))


def time_step(layer, x, repeats) -> float:
    step(layer, x)  # warm-up (and ASI's cold start)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(layer, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops_of(layer, x) -> int:
    with flop_counter() as counter:
        step(layer, x)
    return int(counter.get_total_flops())


def methods(base: nn.Linear, ranks, keep_batch, lora_rank):
    """name -> (layer, the plan choice for the cost model's prediction)."""
    frozen = copy.deepcopy(base).requires_grad_(False)
    return {
        "plain": (base, Choice.full()),
        "asi": (ASILinear(base, ranks), Choice.asi(ranks)),
        "asi:b": (ASILinear(base, keep_batch), Choice.asi(keep_batch)),
        "lora": (LoRALinear(frozen, lora_rank), Choice.lora(lora_rank)),
        "lora+asi:b": (LoRALinear(frozen, lora_rank, asi_ranks=keep_batch), Choice.lora(lora_rank, keep_batch)),
    }


def bench_shape(b, seq, d, out_features, args, gen):
    torch.manual_seed(0)
    base = nn.Linear(d, out_features)
    x = synthetic_activation((b, seq, d), gen)
    ranks = hosvd_ranks(x, args.eps)
    keep_batch = [b, *ranks[1:]]
    res = {}
    for name, (layer, choice) in methods(base, ranks, keep_batch, args.lora_rank).items():
        t = time_step(layer, x, args.repeats)
        xx = x.detach().requires_grad_(True)
        measured = measure_saved_bytes(lambda: layer(xx), layer).activation_bytes
        predicted = predict_saved_bytes(nn.Sequential(copy.deepcopy(base)), xx, Plan({"0": choice})).activation_bytes
        res[name] = (t, measured, predicted, flops_of(layer, x))
    return ranks, res


def table(rows, names) -> str:
    out = ["| B x L x D -> out | ASI ranks | " + " | ".join(f"{m} ms (x plain)" for m in names)
           + " | " + " | ".join(f"{m} saved KiB" for m in names) + " | "
           + " | ".join(f"{m} MFLOP" for m in names) + " | predicted = measured |",
           "|" + "---|" * (3 + 3 * len(names))]
    for shape, ranks, res in rows:
        tp = res["plain"][0]
        times = " | ".join(f"{res[m][0] * 1e3:.2f} ({res[m][0] / tp:.2f}x)" for m in names)
        mem = " | ".join(f"{res[m][1] / 1024:.1f}" for m in names)
        fl = " | ".join(f"{res[m][3] / 1e6:.1f}" for m in names)
        check = "yes" if all(res[m][1] == res[m][2] for m in names) else "NO: " + ", ".join(
            f"{m} {res[m][2]} vs {res[m][1]}" for m in names if res[m][1] != res[m][2])
        out.append(f"| {shape} | {ranks} | {times} | {mem} | {fl} | {check} |")
    return "\n".join(out)


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eps", type=float, default=0.8)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for seq in args.lengths:
        for d in args.widths:
            for out_features in (d, 4 * d):
                ranks, res = bench_shape(args.batch, seq, d, out_features, args, gen)
                rows.append((f"{args.batch}x{seq}x{d} -> {out_features}", ranks, res))
                print(f"  done {args.batch}x{seq}x{d} -> {out_features}", file=sys.stderr, flush=True)
    names = ["plain", "asi", "asi:b", "lora", "lora+asi:b"]
    text = "\n".join([
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats}; "
        f"ASI at HOSVD_eps({args.eps}) ranks, LoRA rank {args.lora_rank}.", "", table(rows, names)]) + "\n"
    print(text)
    if args.out:
        atomic_write(args.out, lambda tmp: tmp.write_text(text))  # never a half-written table
