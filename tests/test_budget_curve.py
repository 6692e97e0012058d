"""The budget curve: best accuracy within each budget, plain-only plans against all plans."""

import random
from types import SimpleNamespace

from autorank.search.budget import budget_curve, is_plain


def rec(n, peak, acc, choices, state="complete"):
    return SimpleNamespace(number=n, predicted_peak_bytes=peak, val_accuracy=acc,
                           choices=choices, state=state)


def test_is_plain():
    assert is_plain({"a": "frozen", "b": "full"})
    assert not is_plain({"a": "asi@0.9", "b": "full"})


def test_curve_steps_and_gain():
    rs = [rec(0, 100, 0.50, {"a": "full"}),
          rec(1, 60, 0.55, {"a": "asi@0.9"}),
          rec(2, 300, 0.90, {"a": "full", "b": "full"}),
          rec(3, 150, 0.80, {"a": "asi@0.9", "b": "asi@0.9"}),
          rec(4, 10, 0.99, {"a": "full"}, state="infeasible"),  # never counted
          rec(5, 20, None, {"a": "full"}, state="failed")]
    curve = budget_curve(rs)
    assert [p.budget_bytes for p in curve] == [60, 100, 150, 300]
    assert [p.any_accuracy for p in curve] == [0.55, 0.55, 0.80, 0.90]
    assert [p.plain_accuracy for p in curve] == [None, 0.50, 0.50, 0.90]
    assert [p.any_trial for p in curve] == [1, 1, 3, 2]
    assert curve[0].gain is None
    assert abs(curve[2].gain - 0.30) < 1e-12
    assert curve[3].gain == 0.0


def test_curve_matches_brute_force():
    g = random.Random(0)
    rs = []
    for n in range(60):
        ch = {"a": g.choice(["frozen", "full", "asi@0.8"]), "b": g.choice(["full", "asi@0.9"])}
        rs.append(rec(n, g.randrange(10, 500), g.random(), ch, g.choice(["complete"] * 4 + ["infeasible"])))
    budgets = [0, 50, 123, 250, 499, 1000]
    curve = budget_curve(rs, budgets)
    for p in curve:
        fit = [r for r in rs if r.state == "complete" and r.predicted_peak_bytes <= p.budget_bytes]
        best = max((r.val_accuracy for r in fit), default=None)
        best_plain = max((r.val_accuracy for r in fit if is_plain(r.choices)), default=None)
        assert p.any_accuracy == best and p.plain_accuracy == best_plain
        assert p.any_accuracy is None or p.plain_accuracy is None or p.any_accuracy >= p.plain_accuracy


def test_curve_by_refit_accuracy():
    rs = [rec(0, 100, 0.5, {"a": "full"}), rec(1, 50, 0.9, {"a": "asi@0.9"})]
    rs[0].refit = 0.7
    rs[1].refit = None  # not refit: left out
    curve = budget_curve(rs, [200], accuracy=lambda r: r.refit)
    assert curve[0].any_trial == 0 and curve[0].any_accuracy == 0.7
