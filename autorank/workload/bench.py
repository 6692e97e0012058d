"""Measure the default workload: pretraining, one trial's fine-tuning, the feature cache's speed-up
and whether training every layer fits the device budget.

    python -m autorank.workload.bench [--input-size 112] [--batch-size 128] [--device rpi4]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from autorank.workload.data import DigitsData
from autorank.workload.device import DeviceProfile
from autorank.workload.models import ModelSpec, mobilenet_v2
from autorank.workload.workload import Paths, TrainerConfig, Workload

CONF = Path(__file__).resolve().parents[2] / "conf"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input-size", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="rpi4")
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    from autorank.cost import measure_saved_bytes
    from autorank.plan import Choice, Plan

    dev_cfg = yaml.safe_load((CONF / "device" / f"{args.device}.yaml").read_text())
    dev_cfg.pop("_target_")
    device = DeviceProfile(**dev_cfg)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="autorank-bench-")
    trainer = TrainerConfig(pretrain_epochs=args.pretrain_epochs, max_epochs=args.epochs)
    wl = Workload(device, ModelSpec(functools.partial(mobilenet_v2)), DigitsData(args.input_size, args.batch_size),
                  trainer, Paths(output_dir=cache, cache_dir=cache))
    print(f"torch threads {torch.get_num_threads()}; {device.summary()}; input {wl.input_shape}")

    t0 = time.perf_counter()
    wl.prepare(progress=False)
    print(f"pretraining (or cache load): {time.perf_counter() - t0:.1f} s, checkpoint {wl.checkpoint_path}")

    # every layer trained plainly, at the device batch: saved activations vs the budget
    from autorank.plan import apply_plan, candidate_layers
    import copy

    every = Plan(layers={n: Choice.full() for n in candidate_layers(wl.model)}, bn="train", lean=False)
    model = apply_plan(copy.deepcopy(wl.model), every).train()
    x = torch.randn(8, *wl.input_shape[1:])
    saved = measure_saved_bytes(lambda: model(x).sum(), model).activation_bytes * wl.input_shape[0] // 8
    print(f"train every layer: saved activations {saved / 2**20:.0f} MB at batch {wl.input_shape[0]} "
          f"(extrapolated from 8) vs budget {device.effective_budget_mb:.0f} MB")
    try:
        from autorank.cost import predict_peak_training_bytes

        peak = predict_peak_training_bytes(wl.model, wl.example_input(), every)
        print(f"predicted peak, every layer: {peak.total_bytes / 2**20:.0f} MB")
    except ImportError:
        pass

    last = Plan(layers={"features.17.conv.0.0": Choice.asi([16, 64, 4, 4]), "features.17.conv.2": Choice.full(),
                        "features.18.0": Choice.full(), "classifier.1": Choice.full()})
    r = wl.finetune(last)  # first trial: computes the features
    print(f"first trial: features {r.features_wall_s:.2f} s, fit {r.train_wall_s:.2f} s, acc {r.val_accuracy:.3f}, "
          f"saved {r.measured_activation_bytes / 2**20:.1f} MB")
    cached, uncached = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        wl.finetune(last)
        cached.append(time.perf_counter() - t)
        wl.trainer.feature_cache = "off"
        t = time.perf_counter()
        wl.finetune(last)
        uncached.append(time.perf_counter() - t)
        wl.trainer.feature_cache = "memory"
    c, u = statistics.median(cached), statistics.median(uncached)
    print(f"trial (last 4 layers, {args.epochs} epochs) median of {args.repeats}: cached {c:.2f} s, "
          f"without cache {u:.2f} s, speed-up {u / c:.1f}x")


if __name__ == "__main__":
    main()
