"""The summary's verdict: does the study's exported plan beat the best plain-only plan that fits
by more than the validation set's noise (2 standard errors of a difference of two binomial
accuracies on val_count images)?"""

from __future__ import annotations

import math

from autorank.search.records import TrialRecord
from autorank.search.result import SearchResult


def rec(number, refit, choices=None, proxy=0.5):
    return TrialRecord(number=number, state="complete", choices=choices or {"a": "asi@0.9", "b": "full"},
                       val_accuracy=proxy, refit_accuracy=refit, predicted_peak_bytes=1)


def result(best, plain, n=1000, search="optuna"):
    return SearchResult(search=search, budget_bytes=10, trials=[best, plain], front=[best], best=best,
                        best_plain=plain, val_count=n)


def test_beyond_two_standard_errors_pays_within_does_not():
    plain = rec(2, 0.80, {"a": "frozen", "b": "full"})
    noise = 2 * math.sqrt((0.85 * 0.15 + 0.80 * 0.20) / 1000)  # 0.0340
    assert result(rec(1, 0.85), plain).verdict().startswith("the search pays here: +0.050 refit accuracy")
    assert f"({noise:.3f})" in result(rec(1, 0.85), plain).verdict()
    v = result(rec(1, 0.83), plain).verdict()  # +0.030 < 0.0339
    assert "did not pay here[/]: +0.030 refit accuracy" in v and "of 1000 validation images" in v
    assert "did not pay" in result(rec(1, 0.85), plain, n=200).verdict()  # the same gap on 200 images is noise
    assert "did not pay" in result(rec(1, 0.78), plain).verdict()  # worse than plain


def test_plain_exported_none_fits_proxy_and_knapsack():
    plain = rec(2, 0.80, {"a": "frozen", "b": "full"})
    assert "exported plan is the best plain-only plan" in result(plain, plain).verdict()
    assert "no plain-only plan fits" in result(rec(1, 0.6), None).verdict()
    # no refit of the plain plan: proxies compared, and said so
    assert "+0.200 proxy accuracy" in result(rec(1, None, proxy=0.9), rec(2, None, {"a": "frozen"}, proxy=0.7)).verdict()
    assert result(rec(1, 0.9), plain, search="knapsack").verdict() is None
    # a language model (no image count): the gap without a noise claim
    assert result(rec(1, 0.9), plain, n=None).verdict() == \
        "exported plan against the best plain-only plan that fits (trial 2): +0.100 (refit accuracy)"


RC = {"a": "full", "b": "full", "blk": "recompute"}


def test_against_the_best_exact_plan_too():
    """Plain training with blocks recomputed is what an engineer does by hand with checkpointing:
    an exported plan that is one says so; an exported plan with ranks is measured against it too."""
    plain = rec(2, 0.50, {"a": "frozen", "b": "full"})
    exact = rec(3, 0.89, RC)
    r = result(rec(3, 0.89, RC), plain)
    r.best_exact = exact
    v = r.verdict()
    assert v.startswith("the search pays here: +0.390 refit accuracy over the best plain-only plan that fits (trial 2)")
    assert v.endswith("the exported plan trains plainly with blocks recomputed (exact: no ranks, "
                      "torch.utils.checkpoint by hand does the same)")
    ranks = result(rec(1, 0.90), plain)
    ranks.best_exact = exact
    v = ranks.verdict()  # +0.40 over plain pays; +0.01 over the exact plan is noise on 1000 images
    assert v.startswith("the search pays here: +0.400")
    assert "; [yellow]the search did not pay here[/]: +0.010 refit accuracy over the best plan with blocks " \
           "recomputed and no ranks (trial 3) is within 2 standard errors" in v
    ranks.best = rec(1, 0.95)
    assert "the search pays here: +0.060 refit accuracy over the best plan with blocks recomputed" in ranks.verdict()
