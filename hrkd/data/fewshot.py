"""Few-shot copies of a prepared task (paper section 3.5).

Section 3.3: "The few-shot training data is selected from the front of our original training
set ... while the dev and test data are the same as our original dev and test sets". So each
rate keeps the first n rows of every domain's train split, n = max(1, round_half_up(rate * N)),
with the rate taken as the decimal written in params.yaml; the subsets are therefore nested.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

from hrkd.data.format import SPLITS, exact_fraction, read_meta, read_split, write_task
from hrkd.errors import HRKDError
from hrkd.io import atomic_dir

log = logging.getLogger("hrkd.data.fewshot")


def rate_tag(rate: float) -> str:
    """Folder name of a rate: the shortest decimal that reads back as it (0.02 -> "0.02")."""
    check_rate(rate)
    return repr(float(rate))


def rate_from_tag(tag: str) -> float:
    """Inverse of :func:`rate_tag`."""
    try:
        rate = float(tag)
    except ValueError:
        raise HRKDError(f"'{tag}' is not a few-shot rate folder name; expected e.g. '0.02'") from None
    return check_rate(rate)


def check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) <= 1.0:
        raise HRKDError(f"few-shot rate {rate!r} is outside (0, 1]; set fewshot.rates to values such as [0.02, 0.05]")
    return float(rate)


def fewshot_size(rate: float, n: int) -> int:
    """Rows kept from a train split of ``n`` rows: rate * n rounded half up, at least 1."""
    return min(n, max(1, math.floor(exact_fraction(check_rate(rate)) * n + Fraction(1, 2))))


def make_fewshot(prepared_dir: str | Path, out_dir: str | Path, rates: Iterable[float]) -> dict[str, dict[str, int]]:
    """Write ``out_dir/<rate_tag>/`` for every rate, atomically; return the train sizes per tag."""
    rates = [check_rate(r) for r in rates]
    if not rates:
        raise HRKDError("fewshot.rates is empty; give at least one rate such as 0.02")
    tags = [rate_tag(r) for r in rates]
    if len(set(tags)) != len(tags):
        raise HRKDError(f"fewshot.rates {rates} repeat a rate; make them distinct")
    meta = read_meta(prepared_dir)
    if meta.fewshot_rate is not None:
        raise HRKDError(f"{prepared_dir} is already a few-shot copy; point --prepared at data/prepared/<task>")
    splits = {d: {s: read_split(prepared_dir, d, s) for s in SPLITS} for d in meta.domains}
    sizes: dict[str, dict[str, int]] = {}
    with atomic_dir(out_dir) as tmp:
        for rate, tag in zip(rates, tags):
            subset = {
                d: {**parts, "train": parts["train"].iloc[: fewshot_size(rate, len(parts["train"]))].reset_index(drop=True)}
                for d, parts in splits.items()
            }
            write_task(tmp / tag, dataclasses.replace(meta, fewshot_rate=rate), subset)
            sizes[tag] = {d: len(parts["train"]) for d, parts in subset.items()}
            log.info("few-shot %s: train rows per domain %s", tag, sizes[tag])
    log.info("wrote %d few-shot copies of %s to %s", len(tags), prepared_dir, out_dir)
    return sizes
