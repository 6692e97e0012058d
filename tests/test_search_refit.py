"""lr searched with the plan, proxy trials then full-fidelity refits, reference points, head rule
(fake workload of search_fakes)."""

import dataclasses
import math

import optuna

from autorank.plan import Plan
from autorank.search.budget import is_plain
from autorank.search.records import REFERENCE_ATTR, REFIT_ATTR
from autorank.search.refit import HEAD_ALONE, PLAIN_REFERENCE, refit_candidates
from autorank.search.study import run_study
from search_fakes import DEVICE, LAYERS, FakeWorkload, study_args

LR = {"lr": {"low": 0.003, "high": 0.1, "log": True}}


def with_lr(space):
    return dataclasses.replace(space, hparams=LR)


def test_lr_is_searched_recorded_in_the_plan_and_used_by_finetune(tmp_path):
    wl = FakeWorkload()
    space, st, kw = study_args(tmp_path, n_trials=14, trial_steps=40)
    res = run_study(wl, DEVICE, with_lr(space), st, **kw)
    study = optuna.load_study(study_name="s", storage=st.storage)
    params = {t.number: t.params for t in study.get_trials()}
    lrs = set()
    trained = [r for r in res.trials if r.feasible and r.duplicate_of is None]
    assert len(trained) == len(wl.runs) >= 5
    for r in res.trials:
        assert 0.003 <= r.hparams["lr"] <= 0.1 and r.hparams["lr"] == params[r.number]["lr"]
        ft = r.plan["meta"]["finetune"]
        assert ft["lr"] == params[r.number]["lr"] and ft["max_steps"] == 40 and ft["epochs"] is None
        lrs.add(r.hparams["lr"])
    # finetune got each trained trial's lr and the trial steps, never epochs
    assert [(run["lr"], run["max_steps"], run["max_epochs"]) for run in wl.runs] == \
        [(r.hparams["lr"], 40, None) for r in trained]
    # warm starts enqueue the trainer's lr (0.05 in the fake), and the deepest plain plan once more
    # at the top of the range (0.1), right after itself; sampled trials vary it
    warm = sorted((r.number, r.source, r.hparams["lr"]) for r in res.trials if r.source)
    probes = [(n, src) for n, src, lr in warm if lr != 0.05]
    assert [lr for _, src, lr in warm if src.endswith(", lr 0.1")] == [0.1] and len(probes) == 1
    deepest = next(r for r in res.trials if r.number == probes[0][0] - 1)
    assert probes[0][1] == f"{deepest.source}, lr 0.1" and deepest.hparams["lr"] == 0.05
    assert deepest.choices == next(r for r in res.trials if r.number == probes[0][0]).choices
    assert len(lrs) > 3
    for n, path in res.plan_files.items():
        assert Plan.load(path).meta["finetune"]["lr"] == params[n]["lr"]


def test_same_choices_other_lr_is_trained_again(tmp_path):
    wl = FakeWorkload()
    space, st, kw = study_args(tmp_path, n_trials=2, warm_start=False, trial_steps=40)
    study = optuna.create_study(study_name="s", storage=st.storage, directions=["maximize", "minimize", "minimize"])
    ch = {"l0": "frozen", "l1": "frozen", "l2": "full"}
    study.enqueue_trial({**ch, "lr": 0.01})
    study.enqueue_trial({**ch, "lr": 0.02})
    res = run_study(wl, DEVICE, with_lr(space), st, **kw)
    assert [r.duplicate_of for r in res.trials] == [None, None] and len(wl.runs) == 2


def refit_runs(wl, steps=120):
    return [tuple(r["choices"][n] for n in LAYERS) for r in wl.runs if r["max_steps"] == steps]


def test_refit_once_per_chosen_plan_and_not_again_on_resume(tmp_path):
    wl = FakeWorkload()
    space, st, kw = study_args(tmp_path, n_trials=20, trial_steps=40, refit_steps=120, refit_top=2,
                               export_path=tmp_path / "plan.yaml")
    res = run_study(wl, DEVICE, with_lr(space), st, **kw)
    chosen = refit_candidates(res.trials, 2)
    assert 2 <= len(chosen) <= 3
    keys = [tuple(r.choices[n] for n in LAYERS) for r in chosen]
    refs = [("full", "full", "full"), ("frozen", "frozen", "full")]  # plain reference, head alone
    assert sorted(refit_runs(wl)) == sorted(keys + refs)  # each exactly once
    # the best plain-only feasible trial is among the refit ones
    plain = [r for r in res.trials if r.feasible and is_plain(r.choices)]
    assert max(plain, key=lambda r: r.val_accuracy).val_accuracy == \
        max(r.val_accuracy for r in chosen if is_plain(r.choices))
    stored = optuna.load_study(study_name="s", storage=st.storage).user_attrs[REFIT_ATTR]
    assert set(stored) == {str(r.number) for r in chosen}
    assert all(v["steps"] == 120 and v["seed"] == 3 for v in stored.values())
    n_runs = len(wl.runs)
    res2 = run_study(wl, DEVICE, with_lr(space), st, **kw)  # resume: the study is complete
    assert len(wl.runs) == n_runs
    assert res2.best.number == res.best.number and res2.best.refit_accuracy == res.best.refit_accuracy
    # a refit at another fidelity is a new refit
    st3 = dataclasses.replace(st, refit_steps=150)
    run_study(wl, DEVICE, with_lr(space), st3, **kw)
    assert sorted(refit_runs(wl, 150)) == sorted(keys + refs)


def test_export_picks_the_best_refit_and_records_its_steps(tmp_path):
    # asi@0.5 on l0 is worth 0.4 more at full fidelity than its proxy says
    wl = FakeWorkload(refit_bonus={"asi@0.5": 0.4}, refit_steps=120)
    space, st, kw = study_args(tmp_path, n_trials=20, trial_steps=40, refit_steps=120, refit_top=4,
                               export_path=tmp_path / "plan.yaml")
    res = run_study(wl, DEVICE, with_lr(space), st, **kw)
    refit = [r for r in res.trials if r.refit_accuracy is not None]
    best = max(refit, key=lambda r: (r.refit_accuracy, -r.predicted_peak_bytes))
    assert res.best.number == best.number and best.choices["l0"] == "asi@0.5"
    proxy_best = max(res.front, key=lambda r: (r.val_accuracy, -r.predicted_peak_bytes))
    assert proxy_best.number != best.number  # the proxy alone would have exported another plan
    plan = Plan.load(tmp_path / "plan.yaml")
    assert plan.meta["choices"] == best.choices
    assert math.isclose(plan.meta["refit_accuracy"], best.refit_accuracy)
    # the held-out loss of the refit beside it (FakeWorkload: 1 - accuracy), and the trial's
    assert math.isclose(plan.meta["refit_val_loss"], 1.0 - best.refit_accuracy) and best.refit_val_loss is not None
    assert math.isclose(plan.meta["val_loss"], 1.0 - best.val_accuracy)
    assert plan.meta["finetune"]["max_steps"] == 120 and plan.meta["finetune"]["lr"] == best.hparams["lr"]
    assert res.best.refit_accuracy >= res.best_plain.refit_accuracy
    assert is_plain(res.best_plain.choices)


def test_reference_points_refit_cached_and_never_exported(tmp_path):
    wl = FakeWorkload()
    space, st, kw = study_args(tmp_path, n_trials=8, trial_steps=40, refit_steps=120,
                               export_path=tmp_path / "plan.yaml")
    res = run_study(wl, DEVICE, with_lr(space), st, **kw)
    ref, head = res.references[PLAIN_REFERENCE], res.references[HEAD_ALONE]
    # plain backprop of all 3 layers: 10_000 + 3 * 4000 > budget 15_000, refit anyway
    assert ref["peak_bytes"] == 22_000 and ref["over_budget"] is True
    assert math.isclose(ref["accuracy"], 0.5 + 0.3 * 6 / 6) and ref["steps"] == 120
    assert ref["hparams"] == {"lr": 0.05}
    assert head["peak_bytes"] == 14_000 and head["over_budget"] is False
    assert math.isclose(head["accuracy"], 0.5 + 0.3 * 3 / 6)
    assert Plan.load(tmp_path / "plan.yaml").meta["predicted_peak_bytes"] <= DEVICE.budget_bytes
    stored = optuna.load_study(study_name="s", storage=st.storage).user_attrs[REFERENCE_ATTR]
    assert stored == res.references


def test_no_sampled_trial_freezes_or_asis_the_head(tmp_path):
    wl = FakeWorkload()
    space, st, kw = study_args(tmp_path, head_rule=True, n_trials=20, trial_steps=40)
    res = run_study(wl, DEVICE, with_lr(space), st, **kw)
    assert len(res.trials) == 20
    assert {r.choices[LAYERS[-1]] for r in res.trials} == {"full"}
    assert {run["choices"][LAYERS[-1]] for run in wl.runs} == {"full"}


def test_the_refit_phase_has_a_progress_bar_one_tick_per_plan(tmp_path, capsys):
    wl = FakeWorkload()
    space, st, kw = study_args(tmp_path, n_trials=10, trial_steps=40, refit_steps=120, refit_top=2,
                               progress=True)
    res = run_study(wl, DEVICE, with_lr(space), st, **kw)
    n = len(refit_candidates(res.trials, 2)) + 2  # the chosen trials and the two references
    assert len(refit_runs(wl)) == n
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("refitting")]
    assert [ln[:5] + ln[-2:-1] for ln in lines] == [["refitting", str(n), "plans", "at", "120", f"{n}/{n}"]]
    run_study(wl, DEVICE, with_lr(space), st, **kw)  # resumed: every plan refit before ticks at once
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("refitting")]
    assert [ln[:5] + ln[-2:-1] for ln in lines] == [["refitting", str(n), "plans", "at", "120", f"{n}/{n}"]]
    assert len(refit_runs(wl)) == n
