"""The planners comparison (autorank.bench.planners) on tiny settings: a 6 k-parameter CNN on 16 px
digits, the small space, 2 trials per study, a few steps, the tight budget only."""

from __future__ import annotations

import json

import pytest

from autorank.bench import planners

FIXED = ["head", "plain", "recompute", "knapsack", "uniform asi@0.5", "uniform asi@0.8", "uniform asi@0.95"]
STUDIES = ["random", "default", "tpe", "nsga2"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(argv, output folder) of one finished tiny run."""
    root = tmp_path_factory.mktemp("planners")
    argv = ["--out", str(root / "out"), "--root", str(root), "--data", "digits", "--model", "small_cnn",
            "--seeds", "0", "--trials", "2", "--trial-steps", "3", "--refit-steps", "6", "--long-factor", "2",
            "--budgets", "tight", "--tight-layers", "1", "--set", "data.input_size=16",
            "--set", "data.batch_size=32", "--set", "trainer.pretrain_epochs=1", "--set", "space=small"]
    assert planners.main(argv) == 0
    return argv, root / "out"


def result(out, planner):
    return json.loads((out / "results" / "tight" / planners.slug(planner) / "seed0.json").read_text())


def test_every_planner_leaves_its_result(bench):
    _, out = bench
    budget = json.loads((out / "budgets.json").read_text())["tight"]["bytes"]
    bases = list((out.parent / ".cache" / "autorank" / "checkpoints").glob("*.pt"))
    assert len(bases) == 1  # one base model, pretrained once; every run fine-tunes it (model.checkpoint)
    for name in FIXED + STUDIES:
        assert result(out, name)["base"] == str(bases[0])
        r = result(out, name)
        assert (r["planner"], r["budget_bytes"], r["seed"]) == (name, budget, 0)
        assert (r["trial_steps"], r["refit_steps"]) == (3, 6)
        assert len(r["trials"]) == 2 if name in STUDIES else [t["lr"] for t in r["trials"]] == [0.003, 0.1]
        assert r["cpu_s"] > 0 and r["wall_s"] > 0
        if r["feasible"]:
            assert r["predicted_peak_bytes"] <= budget
            assert 0.0 <= r["refit_accuracy"] <= 1.0 and 0.0 <= r["long_accuracy"] <= 1.0
        if name in FIXED and r["feasible"]:  # refit at the lr of its best proxy trial
            best = max(r["trials"], key=lambda t: t["accuracy"])
            assert r["hparams"]["lr"] == best["lr"] and r["proxy_accuracy"] == best["accuracy"]
    # the default study's first trial is the knapsack plan at the trainer's settings: the same
    # run as the knapsack planner's proxy at the trainer's lr (0.003, the low end of the range), to the bit
    default, knap = result(out, "default"), result(out, "knapsack")
    assert default["trials"][0]["source"] == "knapsack"
    assert default["trials"][0]["accuracy"] == next(t["accuracy"] for t in knap["trials"] if t["lr"] == 0.003)
    assert default["trials"][0]["peak_bytes"] == knap["predicted_peak_bytes"]


def test_plain_is_the_deepest_plain_plan_that_fits(bench):
    from autorank.cost import predict_peak_training_bytes

    argv, out = bench
    st, _ = planners.parse_args(argv)
    b = planners.Bench(st)
    b.resolve()
    job = planners.build_job(planners.job_overrides(st, "plain", "tight", None, 0), b.workloads)
    prof, _ = b.profile(job)
    wl = job.workload
    peaks = [predict_peak_training_bytes(wl.model, wl.example_input(), prof.to_plan(planners.region_choices(prof, s)),
                                         loss=wl.loss).training_bytes for s in range(len(prof.candidate_names))]
    budget = json.loads((out / "budgets.json").read_text())["tight"]["bytes"]
    n = len(peaks)
    # the tight budget: the last candidate alone fits, every deeper plain plan does not
    assert peaks[n - 1] <= budget < min(peaks[:n - 1])
    plain = result(out, "plain")
    first_fit = min(s for s in range(n) if peaks[s] <= budget)
    assert plain["region_start"] == first_fit == n - 1
    assert plain["predicted_peak_bytes"] == peaks[first_fit] <= budget
    assert plain["choices"] == planners.region_choices(prof, first_fit)
    # the small space offers no block for recomputation: that planner's plan is the plain one
    assert result(out, "recompute")["choices"] == plain["choices"]


def test_region_plans_recompute_the_blocks_inside_the_region():
    """Region starts count conv/linear candidates only; a block is recomputed when each of its
    candidates is in the region, kept otherwise (and always kept without `recompute`)."""
    from types import SimpleNamespace as NS

    kinds = {"f.1.a": "conv", "f.1.b": "conv", "f.2.a": "conv", "head": "linear", "f.1": "block", "f.2": "block"}
    choices = {"conv": ["frozen", "full", "asi@0.9"], "linear": ["full"], "block": ["frozen", "recompute"]}
    prof = NS(candidate_names=[n for n in kinds if kinds[n] != "block"], block_names=["f.1", "f.2"],
              layer=lambda n: NS(kind=kinds[n], choices=choices[kinds[n]]))
    assert planners.region_choices(prof, 1, recompute=True) == {
        "f.1.a": "frozen", "f.1.b": "full", "f.2.a": "full", "head": "full", "f.1": "frozen", "f.2": "recompute"}
    assert planners.region_choices(prof, 0, "asi@0.9", recompute=True) == {
        "f.1.a": "asi@0.9", "f.1.b": "asi@0.9", "f.2.a": "asi@0.9", "head": "full", "f.1": "recompute",
        "f.2": "recompute"}
    assert planners.region_choices(prof, 3)["f.2"] == planners.region_choices(prof, 0)["f.1"] == "frozen"


def test_hypervolume_of_a_small_front():
    # (accuracy, peak) against (0, 1): peaks 0.2-0.5 reach accuracy 0.5, 0.5-0.6 reach 0.6,
    # 0.6-1.0 reach 0.8: 0.3 * 0.5 + 0.1 * 0.6 + 0.4 * 0.8 = 0.53; a dominated point and one
    # beyond the reference add nothing
    front = [(0.5, 0.2), (0.8, 0.6), (0.6, 0.5)]
    assert planners.hypervolume(front, (0.0, 1.0)) == pytest.approx(0.53, abs=1e-12)
    assert planners.hypervolume(front + [(0.4, 0.7), (0.9, 1.5)], (0.0, 1.0)) == pytest.approx(0.53, abs=1e-12)
    assert planners.hypervolume([], (0.0, 1.0)) == 0.0
    # trials: peaks against a 10-byte budget; infeasible and over-budget trials left out
    trials = [planners._trial(i, a, p, 1.0) for i, (a, p) in enumerate([(0.5, 2), (0.8, 6), (0.6, 5)])]
    trials += [planners._trial(3, 0.0, 4, 1.0, "infeasible"), planners._trial(4, 0.99, 11, 1.0)]
    assert planners.front_hypervolume(trials, 10) == pytest.approx(0.53, abs=1e-12)


def test_trials_to_reach_a_target():
    trials = [planners._trial(0, 0.5, 1, 2.0), planners._trial(1, 0.0, 9, 0.5, "infeasible"),
              planners._trial(2, 0.7, 1, 3.0), planners._trial(3, 0.9, 1, 4.0)]
    assert planners.reach(trials, 0.7) == (3, 5.5)
    assert planners.reach(trials[::-1], 0.9) == (4, 9.5)  # in trial order, whatever the list's
    assert planners.reach(trials, 0.95) is None


def test_report_lists_every_planner(bench):
    _, out = bench
    text = (out / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert set(FIXED + STUDIES) <= set(rows)
    knap = result(out, "knapsack")
    cells = [c.strip() for c in rows["knapsack"].split("|")[1:-1]]
    assert cells[2] == f"{knap['refit_accuracy']:.3f}"  # one seed: the value, no std
    # the knapsack plan reaches its own best proxy at its best lr's trial
    assert cells[6] == str(1 + [t["accuracy"] for t in knap["trials"]].index(knap["proxy_accuracy"]))
    assert (out / "figures" / "tight.png").stat().st_size > 10_000


def test_the_report_is_logged_to_mlflow(bench, tmp_path):
    """--mlflow URI: one run with report.md, the figure and each planner's mean refit accuracy."""
    from mlflow import MlflowClient

    argv, out = bench
    uri = f"sqlite:///{tmp_path}/m.db"
    assert planners.main(["--out", str(out), "--report", "--mlflow", uri]) == 0
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("autorank-bench-planners").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "out"
    assert {a.path for a in c.list_artifacts(run.info.run_id)} == {"report.md", "figures"}
    assert [a.path for a in c.list_artifacts(run.info.run_id, "figures")] == ["figures/tight.png"]
    for name in ["knapsack", "default"]:
        r = result(out, name)
        assert run.data.metrics[f"refit_acc.tight.{planners.slug(name)}"] == pytest.approx(r["refit_accuracy"])
