"""nasq's statistics held to statsmodels (in the test extra): the Wilson interval to
``proportion_confint(method="wilson")`` and McNemar's exact test to ``mcnemar(exact=True)``,
over a grid of counts that includes 0 %, 100 % and small samples."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from nasq.results.stats import mcnemar_exact, wilson


def test_wilson_matches_statsmodels():
    cases = [(k, n) for n in (1, 2, 5, 10, 37, 100, 1000, 50_000) for k in sorted({0, 1, n // 3, n // 2, n - 1, n})
             if 0 <= k <= n]
    assert len(cases) >= 40
    for k, n in cases:
        low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
        assert wilson(k, n) == pytest.approx((low, high), abs=1e-12), (k, n)
    assert wilson(0, 0) is None


def test_mcnemar_exact_matches_statsmodels():
    cases = list(itertools.product((0, 1, 2, 5, 12, 40), (0, 1, 3, 9, 25, 60)))
    for only_a, only_b in cases:
        table = np.array([[10, only_a], [only_b, 7]])
        expected = mcnemar(table, exact=True).pvalue
        assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, abs=1e-12), (only_a, only_b)
