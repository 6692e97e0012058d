"""Measure a workload (by default the app's default one): pretraining, whether training every
layer plainly fits the device budget, one trial's fine-tuning, and the feature cache's speed-up
(the same trial with and without cached prefix features, median of --repeats).

    autorank-bench workload                          # the defaults of autorank/conf/config.yaml
    autorank-bench workload model=mobilenet_v2 data.input_size=96 --repeats 3

Overrides are Hydra's, as for `python -m autorank`; `+device=rpi4` is added when no device is given.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from autorank.units import MB


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.input_size=96")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--last", type=int, default=4, help="the trial trains the last N conv/linear layers")
    ap.add_argument("--root", default=None, help="paths.root (cache of checkpoints); default: a temp dir")
    args = ap.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from autorank.app import CONF_DIR
    from autorank.cost import predict_peak_training_bytes
    from autorank.plan import Choice, Plan, candidate_layers
    from autorank.workload.workload import Workload

    root = args.root or tempfile.mkdtemp(prefix="autorank-bench-")
    overrides = list(args.overrides)
    if not any(o.lstrip("+").startswith("device=") for o in overrides):
        overrides.append("+device=rpi4")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={root}", f"paths.output_dir={root}/out", *overrides])
    wl = Workload(instantiate(cfg.device), instantiate(cfg.model), instantiate(cfg.data),
                  instantiate(cfg.trainer), instantiate(cfg.paths))
    device = wl.device
    print(f"torch threads {torch.get_num_threads()}; {device.name} budget {device.budget_bytes / MB:.0f} MB; "
          f"input {wl.input_shape}")

    t0 = time.perf_counter()
    wl.prepare(progress=False)
    print(f"pretraining (or cache load): {time.perf_counter() - t0:.1f} s, checkpoint {wl.checkpoint_path}")

    names = candidate_layers(wl.model)
    every = Plan(layers={n: Choice.full() for n in names}, bn="train", lean=False)
    peak = predict_peak_training_bytes(wl.model, wl.example_input(), every)
    print(f"plain backprop of every layer: predicted peak {peak.total_bytes / MB:.0f} MB "
          f"(activations {peak.activation_bytes / MB:.0f} MB) vs budget {device.budget_bytes / MB:.0f} MB")

    last = Plan(layers={n: Choice.full() for n in names[-args.last:]})
    r = wl.finetune(last)  # the first trial computes (and caches) the prefix features
    print(f"first trial (last {args.last} layers, {r.epochs} epochs): features {r.features_wall_s:.2f} s, "
          f"fit {r.train_wall_s:.2f} s, acc {r.val_accuracy:.3f}")
    cached, uncached = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        wl.finetune(copy.deepcopy(last))
        cached.append(time.perf_counter() - t)
        wl.trainer.feature_cache = "off"
        t = time.perf_counter()
        wl.finetune(copy.deepcopy(last))
        uncached.append(time.perf_counter() - t)
        wl.trainer.feature_cache = "memory"
    c, u = statistics.median(cached), statistics.median(uncached)
    print(f"trial median of {args.repeats}: with cached features {c:.2f} s, without {u:.2f} s, "
          f"speed-up {u / c:.1f}x")
