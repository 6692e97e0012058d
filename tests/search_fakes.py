"""A fake workload, device and cost model for the search tests (imported by test_search_study,
test_tracking and test_export): deterministic accuracy from the choices, costs from tables."""

from collections import OrderedDict
from types import SimpleNamespace

from autorank.cost.process import ProcessPrediction

import optuna
import yaml
from torch import nn

from autorank.plan.plan import FineTuneSettings
from autorank.search.profile import LayerProfile, Profile, fill_peak_bytes
from autorank.search.space import SearchSpace
from autorank.app import CONF_DIR
from autorank.search.study import OptunaSearch

LAYERS = ["l0", "l1", "l2"]
CHOICES = ["frozen", "full", "asi@0.5", "asi@0.9"]
SAVED = {"full": 4000, "asi@0.5": 300, "asi@0.9": 900}
ACC = {"frozen": 0.0, "full": 0.3, "asi@0.5": 0.1, "asi@0.9": 0.25}
FLOPS = {"frozen": 0, "full": 1000, "asi@0.5": 1400, "asi@0.9": 1700}
BASE = 10_000


class FakeCost:
    def peak(self, choices):
        act = sum(SAVED[c] for c in choices.values() if c != "frozen")
        return SimpleNamespace(total_bytes=BASE + act, transient_bytes=0, activation_bytes=act)

    def flops(self, choices):
        return 500 + sum(FLOPS[c] for c in choices.values())


class FakeWorkload:
    """The search's Workload protocol; finetune is deterministic and counts its calls."""

    input_shape = (8, 3, 8, 8)
    num_classes = 2
    loss = "class"
    checkpoint_sha256 = "fake"
    val_count = 200

    def __init__(self, fail_on=None, refit_bonus=None, refit_steps=None):
        """refit_bonus: {choice of l0: accuracy added when trained refit_steps steps} (a plan
        whose proxy accuracy understates it)."""
        self.refit_bonus, self.refit_steps = dict(refit_bonus or {}), refit_steps
        self.calls = []
        self.runs = []  # every finetune call: choices, max_steps, max_epochs, lr
        self.fail_on = fail_on
        self.model = nn.Sequential(OrderedDict(l0=nn.Linear(4, 4), l1=nn.Linear(4, 4), l2=nn.Linear(4, 2)))

    def finetune_settings(self, max_epochs=None, *, max_steps=None, lr=None, momentum=None,
                          weight_decay=None):
        return FineTuneSettings(model_factory="search_fakes:FakeWorkload", input_shape=self.input_shape,
                                lr=0.05 if lr is None else lr, seed=3,
                                epochs=None if max_steps else (max_epochs or 1), max_steps=max_steps)

    def finetune(self, plan, settings, *, progress=False):
        choices = plan.meta["choices"]
        max_steps = settings.max_steps
        self.calls.append(dict(choices))
        self.runs.append({"choices": dict(choices), "max_steps": max_steps, "max_epochs": settings.epochs,
                          "lr": settings.lr})
        if self.fail_on and all(choices[k] == v for k, v in self.fail_on.items()):
            raise RuntimeError("loss is NaN")
        acc = 0.5 + sum(ACC[c] * (i + 1) for i, c in enumerate(choices[n] for n in LAYERS)) / 6
        if max_steps is not None and max_steps == self.refit_steps:
            acc += self.refit_bonus.get(choices["l0"], 0.0)
        act = FakeCost().peak(choices).activation_bytes
        return SimpleNamespace(val_accuracy=acc, train_loss=0.1, val_loss=1.0 - acc, measured_activation_bytes=act,
                               measured_flops=FakeCost().flops(choices), train_wall_s=0.01, epochs=1)


DEVICE = SimpleNamespace(name="fakedev", budget_bytes=BASE + 5000, step_time_s=lambda f: f / 1e9,
                         process_peak=lambda b: ProcessPrediction.from_runtime(300 * 2**20, b, "fake"))


def make_profile(head_rule=False):
    """head_rule: the last layer offers only `full` (the space's `head: full`)."""
    layers = [LayerProfile(name=n, kind="conv", input_shape=[8, 4, 4, 4],
                           choices=["full"] if head_rule and n == LAYERS[-1] else list(CHOICES),
                           ranks={"asi@0.5": [2, 2, 2, 2], "asi@0.9": [4, 3, 3, 3]},
                           sensitivity={"frozen": 3.0 - i, "full": 0.0, "asi@0.5": 1.0, "asi@0.9": 0.3})
              for i, n in enumerate(LAYERS)]
    space = SearchSpace(name="fake", last=3, levels=(0.5, 0.9))
    prof = Profile(key="fake", space=space.to_dict(), layers=layers)
    fill_peak_bytes(prof, FakeCost().peak)
    return space, prof


def study_settings(tmp_path, **overrides) -> OptunaSearch:
    """The study's settings as conf/search/optuna.yaml gives them (the one place with defaults),
    for a study stored under tmp_path with no refit and no export (the YAML's values that name
    the app's other groups, `${...}`, replaced), then `overrides`."""
    d = {k: v for k, v in yaml.safe_load((CONF_DIR / "search" / "optuna.yaml").read_text()).items()
         if not k.startswith("_")}
    d.update({"space": "fake", "storage": f"sqlite:///{tmp_path}/optuna.db", "study_name": "s",
              "run_dir": tmp_path, "export_path": None, "cache_dir": None, "progress": False,
              "refit_steps": None, **overrides})
    assert not [k for k, v in d.items() if isinstance(v, str) and "${" in v], d
    return OptunaSearch(**d)


def study_args(tmp_path, head_rule=False, **settings):
    """(space, settings, run_study keyword arguments) of a small study stored under tmp_path."""
    space, prof = make_profile(head_rule)
    kw = dict(profile=prof, cost=FakeCost(), sampler=optuna.samplers.RandomSampler(seed=0))
    return space, study_settings(tmp_path, **settings), kw

