"""ASI's relative reconstruction error on the default job's real layer inputs (the first 8
candidates, the pretrained base, 3 warm-started downstream batches after a calibration batch):
factorised in the default layout (modes projected N, C, H, W) vs channels-last (memory order:
N, H, W, C). Mean over the 3 batches, per layer, at HOSVD_eps ranks of the calibration batch.

    python scripts/asi_order_error.py [CACHE_DIR]

CACHE_DIR: where measure_fidelity.py keeps its pretrained base (default .cache/fidelity).
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)
import measure_fidelity as mf  # noqa: E402
from autorank.workload.workload import Workload  # noqa: E402
from autorank.plan import candidate_layers  # noqa: E402
from autorank.shortcut.layers import ASIFactorizer  # noqa: E402
from autorank.shortcut.tucker import hosvd_ranks, tucker_reconstruct  # noqa: E402
wl = Workload.from_config(mf.compose(112, 128, "invert", 0, sys.argv[1] if len(sys.argv) > 1 else str(ROOT / ".cache" / "fidelity"), []))
wl.prepare(progress=False)
m = wl.model
names = candidate_layers(m)[:8]
batches = [x for x, _ in wl.calibration_batches(4)]
ins = [mf.layer_inputs(m, names, x) for x in batches]
for eps, kb in [(0.8, True), (0.9, True), (0.9, False), (0.95, False)]:
    tot = {"default": [], "memory": []}
    for n in names:
        r = hosvd_ranks(ins[0][n], eps)
        if kb: r[0] = ins[0][n].shape[0]
        for lay in tot:
            f = ASIFactorizer(r, seed=0)
            errs = []
            for b in range(1, 4):
                x = ins[b][n]
                x = x.contiguous() if lay == "default" else x.contiguous(memory_format=torch.channels_last)
                core, fac = f(x)
                errs.append(float((tucker_reconstruct(core, fac) - x).norm() / x.norm()))
            tot[lay].append(sum(errs) / 3)
    print(f"eps {eps}{'b' if kb else ''}: default " + " ".join(f"{e:.3f}" for e in tot["default"]))
    print(f"        memory  " + " ".join(f"{e:.3f}" for e in tot["memory"]))
