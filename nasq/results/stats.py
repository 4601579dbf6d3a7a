"""Confidence intervals for accuracies and for the difference of two runs' accuracies on the
same images, and McNemar's exact test.

* ``wilson``: the Wilson score interval of a proportion (never outside [0, 1], and not empty at
  0 % or 100 %, unlike the Wald interval).
* ``paired_difference``: Newcombe's square-and-add interval for the difference of two paired
  proportions (Newcombe 1998, method 10): built from the two Wilson intervals and the
  correlation of the pairs, it keeps a width at 0 %, 100 % and between identical runs, where the
  Wald interval collapses to a point.
"""
from __future__ import annotations

import math

#: the normal quantile of a two-sided 95 % interval
Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes / n`` as fractions (None when n is 0)."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(both: int, only_a: int, only_b: int, neither: int,
                      z: float = Z95) -> tuple[float, float, float] | None:
    """Difference B - A of two paired proportions (images right in B minus images right in A,
    over the images both runs saw) with Newcombe's square-and-add interval.

    Args:
        both: pairs both got right; only_a: A right, B wrong; only_b: B right, A wrong;
            neither: both wrong.

    Returns:
        (difference, low, high) as fractions, or None without pairs.
    """
    n = both + only_a + only_b + neither
    if n == 0:
        return None
    right_a, right_b = both + only_a, both + only_b
    pa, pb = right_a / n, right_b / n
    la, ua = wilson(right_a, n, z)
    lb, ub = wilson(right_b, n, z)
    # the correlation of the pairs, with Newcombe's continuity adjustment of the cross product
    margins = right_a * (n - right_a) * right_b * (n - right_b)
    phi = 0.0
    if margins > 0:
        cross = both * neither - only_a * only_b
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    d = pb - pa
    low = d - math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    high = d + math.sqrt(max(0.0, (ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2))
    return d, max(-1.0, low), min(1.0, high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided p-value of McNemar's exact test: of the pairs the runs disagree on, are the ones
    only B got right as many as a fair coin would give?"""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)
