"""Predicted peak training memory of plain plans by where the trained region starts, and of a few
ASI plans, for the app's workload and space (the profile's PlanCost: what the search uses).

    autorank-bench starts /tmp/root                 # the default job's workload and space
    autorank-bench starts /tmp/root data.input_size=96 space.fill=frozen

The first argument is paths.root (its .cache holds the pretrained base and the profile); the rest
are Hydra overrides as for `python -m autorank` (+device=rpi4 is added).
"""
import argparse

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from autorank.app import CONF_DIR
from autorank.search.cost import PlanCost
from autorank.search.profile import profile_workload
from autorank.search.space import load_space
from autorank.units import MB
from autorank.workload.workload import Workload


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="paths.root: its .cache holds the pretrained base and the profile")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides as for `python -m autorank`")
    args = ap.parse_args(argv)
    root, extra = args.root, args.overrides
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={root}", f"paths.output_dir={root}/out", "+device=rpi4", *extra])
    wl = Workload(instantiate(cfg.device), instantiate(cfg.model), instantiate(cfg.data),
                  instantiate(cfg.trainer), instantiate(cfg.paths))
    wl.prepare(progress=False)
    prof = profile_workload(wl, load_space(OmegaConf.to_container(cfg.space)), cache_dir=wl.paths.cache_dir,
                            progress=False)
    names, budget = prof.candidate_names, wl.device.budget_bytes
    cost = PlanCost(wl.model, wl.example_input(), prof)
    print(f"# {wl.device.name} budget {budget / MB:.1f} MB, input {tuple(wl.input_shape)}, space "
          f"{prof.space.get('name')} (fill {prof.space.get('fill', 'frozen')}), candidates {len(names)}")

    def show(label, ch):
        p = cost.peak(ch)
        print(f"{label:36s} peak {p.total_bytes / MB:7.1f} MB  {'fits' if p.total_bytes <= budget else 'OVER'}"
              f"  GFLOP/step {cost.flops(ch) / 1e9:6.2f}")

    show("head only", {names[-1]: "full"})
    for k in range(len(names) - 1):
        show(f"plain from candidate {k} ({names[k]})", {n: "full" for n in names[k:]})
    for lv in ("asi@0.8:b", "asi@0.9:b", "asi@0.95:b"):
        for k in (2, len(names) - 4):
            if all(lv in prof.layer(n).choices for n in names[:k]):
                show(f"{lv} on candidates 0-{k - 1}, rest plain", {**{n: lv for n in names[:k]},
                                                                    **{n: "full" for n in names[k:]}})
