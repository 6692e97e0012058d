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
        "exported plan against the best plain-only plan that fits: +0.100 (refit accuracy)"
