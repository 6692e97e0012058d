"""The Optuna study with a fake workload: front, resume, infeasible never trained, failures."""

import dataclasses

import optuna
import pytest

from autorank.plan import Plan, model_fingerprint
from autorank.plan.plan import FineTuneSettings
from autorank.search.records import records_from_storage
from autorank.search.study import run_study
from search_fakes import DEVICE, LAYERS, FakeCost, FakeWorkload, study_args


def stored_front(storage, name="s"):
    """The front recomputed here from the stored trials: complete trials whose constraints all
    hold and that no other such trial dominates (accuracy up, memory and FLOPs down)."""
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    feasible = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                and all(v <= 0 for v in t.constraints.values())]

    def dom(a, b):
        return (a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]) and (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])

    return {t.number for t in feasible if not any(dom(o.values, t.values) for o in feasible)}


def test_front_is_the_non_dominated_feasible_set_and_infeasible_never_trained(tmp_path):
    wl = FakeWorkload()
    space, st, kw = study_args(tmp_path, n_trials=25, export_path=tmp_path / "plan.yaml")
    res = run_study(wl, DEVICE, space, st, **kw)
    assert len(res.trials) == 25
    expect = stored_front(st.storage)
    assert expect and {r.number for r in res.front} == expect
    assert {r.number for r in res.trials if r.on_front} == expect
    # infeasible (over budget or nothing trained) never trained; every trained plan fits
    infeasible = [r for r in res.trials if r.state == "infeasible"]
    assert infeasible, "the budget must bind in this instance"
    trained_keys = [tuple(c[n] for n in LAYERS) for c in wl.calls]
    for r in infeasible:
        assert tuple(r.choices[n] for n in LAYERS) not in trained_keys
        if all(r.choices[n] == "frozen" for n in LAYERS):
            assert r.fail_reason == "plan trains no layer"
        else:  # over budget, by the fake cost's own figure
            assert r.predicted_peak_bytes == FakeCost().peak(r.choices).total_bytes > DEVICE.budget_bytes
            assert r.fail_reason is None
    for c in wl.calls:
        assert FakeCost().peak(c).total_bytes <= DEVICE.budget_bytes
    assert len(wl.calls) == len(set(trained_keys))  # a duplicate plan is never retrained
    dups = [r for r in res.trials if r.duplicate_of is not None]
    for r in dups:
        assert r.val_accuracy == res.trials[r.duplicate_of].val_accuracy
    # warm start: knapsack first, then uniform levels and plain last layers
    assert res.trials[0].source == "knapsack"
    assert {r.source for r in res.trials[:4]} >= {"knapsack", "uniform asi@0.5", "full last 1"}
    # export: best feasible (highest accuracy, then less memory), stamped by the live model
    best = max(res.front, key=lambda r: (r.val_accuracy, -r.predicted_peak_bytes))
    assert res.best.number == best.number
    plan = Plan.load(tmp_path / "plan.yaml")
    assert plan.meta["choices"] == best.choices and plan.meta["val_accuracy"] == best.val_accuracy
    assert plan.meta["val_loss"] == best.val_loss == pytest.approx(1.0 - best.val_accuracy)
    assert plan.fingerprint == model_fingerprint(wl.model)
    assert set(res.plan_files) == expect
    assert Plan.load(res.plan_files[best.number]).to_dict() == plan.to_dict()


def test_plans_carry_typed_finetune_settings(tmp_path):
    wl = FakeWorkload()
    space, st, kw = study_args(tmp_path, n_trials=4, trial_steps=None, max_epochs=7, export_path=tmp_path / "p.yaml")
    run_study(wl, DEVICE, space, st, **kw)
    got = FineTuneSettings.from_plan(Plan.load(tmp_path / "p.yaml"))
    assert got == wl.finetune_settings(7) and got.epochs == 7 and got.input_shape == (8, 3, 8, 8)
    # a plan file written before meta.finetune existed still reads back typed
    old = Plan(meta={"model": {"factory": "m:f", "kwargs": {"width": 8}}, "lr": 0.03, "seed": 2,
                     "input_shape": [4, 3, 16, 16]})
    assert FineTuneSettings.from_plan(Plan.from_dict(old.to_dict())) == FineTuneSettings(
        model_factory="m:f", model_kwargs={"width": 8}, input_shape=(4, 3, 16, 16), lr=0.03, seed=2)
    assert FineTuneSettings.from_plan(Plan()) is None
    with pytest.raises(ValueError, match="module:function"):
        FineTuneSettings(model_factory="no_colon")


def test_resume_continues_without_repeating_or_losing(tmp_path):
    wl = FakeWorkload()
    space, st, kw = study_args(tmp_path, n_trials=6)
    first = run_study(wl, DEVICE, space, st, **kw)
    before = {r.number: (r.choices, r.state, r.val_accuracy) for r in first.trials}
    n_calls = len(wl.calls)
    kw["sampler"] = optuna.samplers.RandomSampler(seed=0)
    again = run_study(wl, DEVICE, space, st, **kw)  # total reached: nothing to do
    assert again.n_new == 0 and len(again.trials) == 6 and len(wl.calls) == n_calls
    more = run_study(wl, DEVICE, space, dataclasses.replace(st, n_trials=14), **kw)
    assert more.n_new == 8 and len(more.trials) == 14
    after = {r.number: (r.choices, r.state, r.val_accuracy) for r in more.trials}
    assert all(after[k] == v for k, v in before.items())  # nothing lost or changed
    sources = [r.source for r in more.trials if r.source]
    assert len(sources) == len(set(sources))  # warm starts not enqueued twice
    keys = [tuple(c[n] for n in LAYERS) for c in wl.calls]
    assert len(keys) == len(set(keys))  # no plan trained twice across the two runs
    extra = run_study(wl, DEVICE, space, dataclasses.replace(st, n_trials=3, n_trials_total=False), **kw)
    assert extra.n_new == 3 and len(extra.trials) == 17


def test_failing_trial_recorded_and_study_finishes(tmp_path):
    wl = FakeWorkload(fail_on={"l0": "frozen", "l1": "frozen", "l2": "full"})
    space, st, kw = study_args(tmp_path, n_trials=8)
    res = run_study(wl, DEVICE, space, st, **kw)
    assert len(res.trials) == 8
    failed = [r for r in res.trials if r.state == "failed"]
    assert len(failed) == 1 and failed[0].fail_reason == "RuntimeError: loss is NaN"
    st_ = optuna.load_study(study_name="s", storage=st.storage)
    assert st_.trials[failed[0].number].state == optuna.trial.TrialState.FAIL
    assert any(r.state == "complete" for r in res.trials[failed[0].number + 1:])
    stored = records_from_storage(st.storage, "s")
    assert {r.number for r in stored if r.on_front} == stored_front(st.storage) == \
        {r.number for r in res.front}
    assert [r.state for r in stored] == [r.state for r in res.trials]


def test_time_split_covers_the_steps(tmp_path):
    space, st, kw = study_args(tmp_path, n_trials=5)
    res = run_study(FakeWorkload(), DEVICE, space, st, **kw)
    t = res.time_split_s
    assert set(t) == {"profile", "predict", "train", "log"}
    assert t["profile"] == 0.0  # the profile was given
    assert t["predict"] > 0 and t["train"] > 0 and t["log"] > 0
    assert sum(t.values()) <= res.wall_s


def test_cost_model_mismatch_warns(tmp_path):
    class Off(FakeWorkload):
        def finetune(self, plan, settings, **k):
            r = super().finetune(plan, settings, **k)
            r.measured_activation_bytes = int(r.measured_activation_bytes * 1.05) + 1
            return r

    space, st, kw = study_args(tmp_path, n_trials=1)
    with pytest.warns(UserWarning, match="COST MODEL MISMATCH"):
        res = run_study(Off(), DEVICE, space, st, **kw)
    stored = optuna.load_study(study_name="s", storage=st.storage)
    assert "5.0% off" in stored.trials[0].user_attrs["autorank"]["cost_model_mismatch"][0]
    assert res.trials[0].measured_activation_bytes > res.trials[0].predicted_activation_bytes


def test_flops_mismatch_is_flagged_and_agreement_is_not(tmp_path):
    space, st, kw = study_args(tmp_path, n_trials=1)
    res = run_study(FakeWorkload(), DEVICE, space, st, **kw)
    trained = [r for r in res.trials if r.measured_flops is not None]
    assert trained and all(r.measured_flops == r.flops > 0 for r in trained)  # next to the prediction
    stored = optuna.load_study(study_name="s", storage=st.storage)
    assert not any("cost_model_mismatch" in t.user_attrs.get("autorank", {}) for t in stored.trials)

    class Off(FakeWorkload):
        def finetune(self, plan, settings, **k):
            r = super().finetune(plan, settings, **k)
            r.measured_flops = int(r.measured_flops * 1.03)
            return r

    space, st, kw = study_args(tmp_path / "off", n_trials=1)
    with pytest.warns(UserWarning, match="measured FLOPs"):
        run_study(Off(), DEVICE, space, st, **kw)
    stored = optuna.load_study(study_name="s", storage=st.storage)
    msgs = [m for t in stored.trials for m in t.user_attrs.get("autorank", {}).get("cost_model_mismatch", [])]
    assert msgs and all("measured FLOPs" in m and "3.0% off" in m for m in msgs)


def test_warm_starts_take_at_most_half_and_leave_nothing_waiting(tmp_path):
    """Measured on the GPU run of the default job: 15 warm-start plans for 12 trials left no trial
    to the sampler and 3 trials WAITING. Warm starts now take at most half of a run's trials."""
    from autorank.search.warmstart import warm_start_plans

    wl = FakeWorkload()
    space, st, kw = study_args(tmp_path, n_trials=4)
    res = run_study(wl, DEVICE, space, st, **kw)
    assert len(res.trials) == 4
    assert sorted({r.state for r in res.trials}) <= ["complete", "infeasible"]
    assert sum(r.source is not None for r in res.trials) == 2  # 4 // 2 warm starts
    assert len(warm_start_plans(kw["profile"], DEVICE.budget_bytes, kw["cost"])) > 2  # the cap mattered


def test_warm_starts_hold_the_deepest_plain_plan_that_fits():
    """The plain plan a plan with ranks has to beat: the most last candidates trained plainly
    within the budget (here 1 of 3: two plain layers need 8000 bytes over a 5000-byte budget),
    and no plain plan over the budget besides the explicit 'full every candidate' reference."""

    from autorank.search.warmstart import warm_start_plans
    from search_fakes import BASE, FakeCost, make_profile

    _, prof = make_profile()
    plans = dict(warm_start_plans(prof, BASE + 5000, FakeCost()))
    assert plans["full last 1"] == {"l0": "frozen", "l1": "frozen", "l2": "full"}
    assert "full last 2" not in plans
    roomy = dict(warm_start_plans(prof, BASE + 8000, FakeCost()))
    assert roomy["full last 2"] == {"l0": "frozen", "l1": "full", "l2": "full"}


def test_fill_full_space_samples_the_region_start_evenly(tmp_path):
    """With `fill: full` (profile.order set) the trial suggests where the trained region starts;
    the candidates before it are frozen, and warm starts enqueue their start with their choices.
    Per-layer sampling alone starts 7 of 8 plans at the first layer (P(frozen) = 1/4 here)."""
    import optuna

    from autorank.search.trial import START

    wl = FakeWorkload()
    space, st, kw = study_args(tmp_path, n_trials=30, warm_start=True)
    kw["profile"].order = list(LAYERS)
    res = run_study(wl, DEVICE, space, st, **kw)
    study = optuna.load_study(study_name="s", storage=st.storage)
    trials = [t for t in study.trials if t.state.is_finished()]
    assert len(trials) == 30
    starts = [LAYERS.index(t.params[START]) for t in trials]
    assert all(s in starts for s in range(3))  # every depth tried
    for t, rec in zip(trials, res.trials):
        first = LAYERS.index(t.params[START])
        assert all(rec.choices[n] == "frozen" for n in LAYERS[:first])
        # sampled or warm start: exactly the candidates from the start on are the trial's params
        assert set(t.params) - {START, "lr"} == set(LAYERS[first:])
    for rec in res.trials:
        if rec.source is not None:  # a warm start's region starts at its first trained layer
            t = study.trials[rec.number]
            trained = [n for n in LAYERS if rec.choices[n] != "frozen"]
            assert t.params[START] == (trained[0] if trained else LAYERS[-1])
    # without fill (order empty) no START param is suggested
    space2, st2, kw2 = study_args(tmp_path / "b", n_trials=3)
    (tmp_path / "b").mkdir()
    st2 = type(st2)(**{**st2.__dict__, "storage": f"sqlite:///{tmp_path}/b/optuna.db"})
    run_study(FakeWorkload(), DEVICE, space2, st2, **kw2)
    assert all(START not in t.params for t in optuna.load_study(study_name="s", storage=st2.storage).trials)


def test_warm_starts_come_most_telling_first():
    """A study enqueues only the first n_trials // 2: the deepest plain plan that fits comes
    right after the knapsack and the plain-everything reference, before the uniform levels."""
    from autorank.search.warmstart import warm_start_plans
    from search_fakes import BASE, FakeCost, make_profile

    _, prof = make_profile()
    srcs = [s for s, _ in warm_start_plans(prof, BASE + 8000, FakeCost())]
    assert srcs == ["knapsack", "full every candidate", "full last 2", "uniform asi@0.9", "uniform asi@0.5",
                    "full last 1"]
