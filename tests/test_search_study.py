"""The Optuna study with a fake workload: front, resume, infeasible never trained, failures."""

from types import SimpleNamespace

import optuna
import pytest

from autorank.plan import Plan
from autorank.search.profile import LayerProfile, Profile, fill_peak_bytes
from autorank.search.space import SearchSpace
from autorank.search.study import pareto_front, records_from_storage, run_study

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
    """Same finetune signature as autorank.workload.Workload; deterministic; counts calls."""

    input_shape = (8, 3, 8, 8)
    checkpoint_sha256 = "fake"
    model = None

    def __init__(self, fail_on=None):
        self.calls = []
        self.fail_on = fail_on

    def finetune(self, plan, *, max_epochs=None, progress=False):
        choices = plan.meta["choices"]
        self.calls.append(dict(choices))
        if self.fail_on and all(choices[k] == v for k, v in self.fail_on.items()):
            raise RuntimeError("loss is NaN")
        acc = 0.5 + sum(ACC[c] * (i + 1) for i, c in enumerate(choices[n] for n in LAYERS)) / 6
        act = FakeCost().peak(choices).activation_bytes
        return SimpleNamespace(val_accuracy=acc, train_loss=0.1, measured_activation_bytes=act,
                               measured_flops=FakeCost().flops(choices), train_wall_s=0.01, epochs=1)


DEVICE = SimpleNamespace(name="fakedev", budget_bytes=BASE + 5000, step_time_s=lambda f: f / 1e9)


def make_profile():
    layers = [LayerProfile(name=n, kind="conv", input_shape=[8, 4, 4, 4], choices=list(CHOICES),
                           ranks={"asi@0.5": [2, 2, 2, 2], "asi@0.9": [4, 3, 3, 3]},
                           sensitivity={"frozen": 3.0 - i, "full": 0.0, "asi@0.5": 1.0, "asi@0.9": 0.3})
              for i, n in enumerate(LAYERS)]
    space = SearchSpace(name="fake", last=3, levels=(0.5, 0.9))
    prof = Profile(key="fake", space=space.to_dict(), layers=layers)
    fill_peak_bytes(prof, FakeCost().peak)
    return space, prof


def study_kwargs(tmp_path, **kw):
    space, prof = make_profile()
    d = dict(profile=prof, cost=FakeCost(), storage=f"sqlite:///{tmp_path}/optuna.db",
             study_name="s", run_dir=tmp_path, progress=False,
             sampler=optuna.samplers.RandomSampler(seed=0))
    d.update(kw)
    return space, d


def test_front_equals_non_dominated_feasible_from_storage_and_infeasible_never_trained(tmp_path):
    wl = FakeWorkload()
    space, kw = study_kwargs(tmp_path, export_path=tmp_path / "plan.yaml")
    res = run_study(wl, DEVICE, space, n_trials=25, **kw)
    assert len(res.trials) == 25
    # recompute from storage, independently of run_study's records
    st = optuna.load_study(study_name="s", storage=kw["storage"])
    trials = st.get_trials()
    feasible = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                and all(v <= 0 for v in t.constraints.values())]
    def dom(a, b):
        return (a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]) and (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])
    expect = {t.number for t in feasible if not any(dom(o.values, t.values) for o in feasible)}
    assert {r.number for r in res.front} == expect == {t.number for t in st.best_trials}
    assert expect
    # infeasible (over budget or nothing trained) never trained; every trained plan fits
    infeasible = [r for r in res.trials if r.state == "infeasible"]
    assert infeasible, "the budget must bind in this instance"
    trained_keys = [tuple(c[n] for n in LAYERS) for c in wl.calls]
    for r in infeasible:
        assert tuple(r.choices[n] for n in LAYERS) not in trained_keys
    for c in wl.calls:
        assert FakeCost().peak(c).total_bytes <= DEVICE.budget_bytes
    assert len(wl.calls) == len(set(trained_keys))  # a duplicate plan is never retrained
    # warm start: knapsack first, then uniform levels and plain last layers
    assert res.trials[0].source == "knapsack"
    assert {r.source for r in res.trials[:4]} >= {"knapsack", "uniform asi@0.5", "full last 1"}
    # export: best feasible (highest accuracy, then less memory)
    best = max(res.front, key=lambda r: (r.val_accuracy, -r.predicted_peak_bytes))
    assert res.best.number == best.number
    assert Plan.load(tmp_path / "plan.yaml").meta["choices"] == best.choices
    assert set(res.plan_files) == expect


def test_resume_continues_without_repeating_or_losing(tmp_path):
    wl = FakeWorkload()
    space, kw = study_kwargs(tmp_path)
    first = run_study(wl, DEVICE, space, n_trials=6, **kw)
    before = {r.number: (r.choices, r.state, r.val_accuracy) for r in first.trials}
    n_calls = len(wl.calls)
    kw["sampler"] = optuna.samplers.RandomSampler(seed=0)
    again = run_study(wl, DEVICE, space, n_trials=6, **kw)  # total reached: nothing to do
    assert again.n_new == 0 and len(again.trials) == 6 and len(wl.calls) == n_calls
    more = run_study(wl, DEVICE, space, n_trials=14, **kw)
    assert more.n_new == 8 and len(more.trials) == 14
    after = {r.number: (r.choices, r.state, r.val_accuracy) for r in more.trials}
    assert all(after[k] == v for k, v in before.items())  # nothing lost or changed
    sources = [r.source for r in more.trials if r.source]
    assert len(sources) == len(set(sources))  # warm starts not enqueued twice
    keys = [tuple(c[n] for n in LAYERS) for c in wl.calls]
    assert len(keys) == len(set(keys))  # no plan trained twice across the two runs
    extra = run_study(wl, DEVICE, space, n_trials=3, n_trials_total=False, **kw)
    assert extra.n_new == 3 and len(extra.trials) == 17


def test_failing_trial_recorded_and_study_finishes(tmp_path):
    wl = FakeWorkload(fail_on={"l0": "frozen", "l1": "frozen", "l2": "full"})
    space, kw = study_kwargs(tmp_path)
    res = run_study(wl, DEVICE, space, n_trials=8, **kw)
    assert len(res.trials) == 8
    failed = [r for r in res.trials if r.state == "failed"]
    assert len(failed) == 1 and failed[0].fail_reason == "RuntimeError: loss is NaN"
    st = optuna.load_study(study_name="s", storage=kw["storage"])
    assert st.trials[failed[0].number].state == optuna.trial.TrialState.FAIL
    assert any(r.state == "complete" for r in res.trials[failed[0].number + 1:])
    assert {r.number for r in pareto_front(records_from_storage(kw["storage"], "s"))} == \
        {r.number for r in res.front}


def test_cost_model_mismatch_warns(tmp_path):
    class Off(FakeWorkload):
        def finetune(self, plan, **k):
            r = super().finetune(plan, **k)
            r.measured_activation_bytes = int(r.measured_activation_bytes * 1.05) + 1
            return r

    space, kw = study_kwargs(tmp_path)
    with pytest.warns(UserWarning, match="COST MODEL MISMATCH"):
        res = run_study(Off(), DEVICE, space, n_trials=1, **kw)
    st = optuna.load_study(study_name="s", storage=kw["storage"])
    assert "5.0% off" in st.trials[0].user_attrs["autorank"]["cost_model_mismatch"][0]
    assert res.trials[0].measured_activation_bytes > res.trials[0].predicted_activation_bytes


def test_flops_mismatch_is_flagged_and_agreement_is_not(tmp_path):
    space, kw = study_kwargs(tmp_path)
    res = run_study(FakeWorkload(), DEVICE, space, n_trials=1, **kw)
    trained = [r for r in res.trials if r.measured_flops is not None]
    assert trained and all(r.measured_flops == r.flops > 0 for r in trained)  # next to the prediction
    st = optuna.load_study(study_name="s", storage=kw["storage"])
    assert not any("cost_model_mismatch" in t.user_attrs.get("autorank", {}) for t in st.trials)

    class Off(FakeWorkload):
        def finetune(self, plan, **k):
            r = super().finetune(plan, **k)
            r.measured_flops = int(r.measured_flops * 1.03)
            return r

    space, kw = study_kwargs(tmp_path / "off")
    with pytest.warns(UserWarning, match="measured FLOPs"):
        run_study(Off(), DEVICE, space, n_trials=1, **kw)
    st = optuna.load_study(study_name="s", storage=kw["storage"])
    msgs = [m for t in st.trials for m in t.user_attrs.get("autorank", {}).get("cost_model_mismatch", [])]
    assert msgs and all("measured FLOPs" in m and "3.0% off" in m for m in msgs)
