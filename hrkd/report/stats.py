"""Small statistics of the report: mean ± std over seeds, the paired t-test, the improvement rate.

Pure functions on plain floats so the tests can check them against hand-computed values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hrkd.errors import HRKDError


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and *sample* standard deviation (ddof = 1) over runs; std is None for a single run.

    The paper reports "standard deviations" over five runs without saying which; ddof = 1 is the
    usual choice for a handful of seeds (it estimates the run-to-run spread, not the spread of
    these particular runs).
    """
    if not values:
        raise HRKDError("no values to average; check that the metrics files of the runs exist")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


@dataclass(frozen=True)
class PairedTest:
    """Result of a paired t-test of ``a - b`` (two-sided)."""

    pairing: str
    n: int
    mean_diff: float | None
    t: float | None
    df: int | None
    p: float | None
    tested: bool
    note: str

    def to_json(self) -> dict[str, Any]:
        return {k: (_round(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def paired_t_test(a: Sequence[float], b: Sequence[float], *, pairing: str, min_pairs: int = 3) -> PairedTest:
    """Two-sided paired t-test of mean(a - b) = 0, t = mean(d) / (sd(d) / sqrt(n)), df = n - 1.

    With fewer than ``min_pairs`` pairs no test is made and ``note`` says so: two seeds give
    df = 1, where a t-test can call almost anything (in)significant. When every difference is the
    same (sd = 0), t is undefined; the note says whether the runs were identical.
    """
    from scipy import stats

    if len(a) != len(b):
        raise HRKDError(f"paired test needs the same number of values on both sides, got {len(a)} and {len(b)}")
    n = len(a)
    diffs = [x - y for x, y in zip(a, b)]
    mean_diff = math.fsum(diffs) / n if n else None
    if n < min_pairs:
        return PairedTest(pairing, n, mean_diff, None, None, None, False,
                          f"too few samples: n={n} pairs < report.min_pairs={min_pairs}; no significance claimed")
    _, sd = mean_std(diffs)
    if not sd:
        what = "all runs identical" if mean_diff == 0 else "every pair differs by the same amount"
        return PairedTest(pairing, n, mean_diff, None, n - 1, None, False, f"t undefined: {what} (sd of differences = 0)")
    t = mean_diff / (sd / math.sqrt(n))
    p = float(2.0 * stats.t.sf(abs(t), n - 1))
    return PairedTest(pairing, n, mean_diff, t, n - 1, p, True, "")


def improvement_rate(ours: float, base: float) -> float:
    """Relative gain in % of ``ours`` over ``base``: 100 * (ours - base) / base.

    Figure 2's "improvement rate" (section 3.5) is not defined in the paper; this is the reading
    its 10.1% fits (a relative, not an absolute, gain of average accuracy). See docs/report.md.
    """
    if base <= 0:
        raise HRKDError(f"improvement rate needs a positive baseline accuracy, got {base}")
    return 100.0 * (ours - base) / base


def _round(value: float, digits: int = 6) -> float:
    # Metrics files keep 6 decimals; rounding also keeps float noise out of `dvc metrics diff`.
    return round(value, digits)
