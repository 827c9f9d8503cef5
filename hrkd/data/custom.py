"""Your own multi-domain classification data: CSV, JSONL or parquet, one file or one per split.

Paths in params.yaml are relative to where the stage runs (the repository root under DVC).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import pandas as pd

from hrkd.config import CustomData
from hrkd.data.format import SPLITS, check_domain_name, exact_fraction, make_frame, stratified_split
from hrkd.errors import HRKDError

log = logging.getLogger("hrkd.data.custom")

EXTENSIONS = (".csv", ".jsonl", ".parquet")


def read_table(path: Path) -> pd.DataFrame:
    """Load a CSV (every cell as text), JSONL (one object a line) or parquet file."""
    if path.suffix.lower() not in EXTENSIONS:
        raise HRKDError(f"{path}: unsupported file type '{path.suffix}'; use one of {list(EXTENSIONS)}")
    if not path.is_file():
        raise HRKDError(f"{path} not found; fix data.custom.path/train/dev/test (paths are relative to the repository root)")
    try:
        if path.suffix.lower() == ".csv":
            # Empty cells must stay "" (and be reported) rather than become NaN or the string "nan".
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                records = [json.loads(line) for line in handle if line.strip()]
            if not all(isinstance(r, dict) for r in records):
                raise HRKDError(f"{path}: every line must be a JSON object; fix the file")
            return pd.DataFrame.from_records(records)
        return pd.read_parquet(path)
    except HRKDError:
        raise
    except (ValueError, UnicodeDecodeError, OSError, pd.errors.ParserError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise HRKDError(f"{path} is not a readable {path.suffix[1:]} file ({reason}); fix or re-export it") from None


def label_name(value: Any) -> str | None:
    """Canonical text of a label cell: 1, 1.0 and "1" are the same label."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def default_labels(values: Sequence[str]) -> list[str]:
    """Sorted unique labels: numerically when all are integers (so 10 follows 9), else as text."""
    unique = set(values)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def _column(frame: pd.DataFrame, name: str, where: str, knob: str) -> pd.Series:
    if name not in frame.columns:
        raise HRKDError(f"{where} has no column '{name}' (columns: {list(frame.columns)[:12]}); set data.custom.{knob}")
    return frame[name]


def _texts(series: pd.Series, where: str, name: str) -> list[str]:
    texts = ["" if pd.isna(v) else str(v) for v in series.tolist()]
    for i, text in enumerate(texts):
        if not text.strip():
            raise HRKDError(f"{where}: row {i} has an empty '{name}'; remove the row or fill it in")
    return texts


def load_rows(path: Path, cfg: CustomData) -> pd.DataFrame:
    """One file as columns uid, row, domain, text, text_pair, label_name (validated, file order)."""
    frame = read_table(path)
    where = str(path)
    text = _texts(_column(frame, cfg.text_column, where, "text_column"), where, cfg.text_column)
    pair: list[str | None] = [None] * len(frame)
    if cfg.text_pair_column:
        pair = list(_texts(_column(frame, cfg.text_pair_column, where, "text_pair_column"), where, cfg.text_pair_column))
    labels = [label_name(v) for v in _column(frame, cfg.label_column, where, "label_column").tolist()]
    if None in labels or "" in labels:
        row = [i for i, v in enumerate(labels) if not v][0]
        raise HRKDError(f"{where}: row {row} has no label in column '{cfg.label_column}'; fill it in or drop the row")
    domains = [label_name(v) for v in _column(frame, cfg.domain_column, where, "domain_column").tolist()]
    if None in domains or "" in domains:
        row = [i for i, v in enumerate(domains) if not v][0]
        raise HRKDError(f"{where}: row {row} has no domain in column '{cfg.domain_column}'; fill it in or drop the row")
    return pd.DataFrame(
        {
            "uid": [f"{path.name}:{i}" for i in range(len(frame))],
            # The split key is the row number alone, so renaming or converting the file keeps the split.
            "row": [str(i) for i in range(len(frame))],
            "domain": domains,
            "text": text,
            "text_pair": pair,
            "label_name": labels,
        }
    )


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def carve_sizes(n: int, dev_fraction: float, test_fraction: float, need: Sequence[str], where: str) -> dict[str, int]:
    """Sizes of the splits carved out of ``n`` rows: each fraction rounded half up, train gets the rest."""
    fractions = {"dev": exact_fraction(dev_fraction), "test": exact_fraction(test_fraction)}
    sizes = {split: _round_half_up(n * fractions[split]) for split in need}
    sizes["train"] = n - sum(sizes.values())
    if sizes["train"] < 1 or any(sizes[s] < 1 for s in need):
        raise HRKDError(
            f"{where}: {n} rows cannot be split into {sizes}; add data or change data.custom.dev_fraction/test_fraction"
        )
    return sizes


def _files(cfg: CustomData) -> dict[str, Path | None]:
    if cfg.path and (cfg.train or cfg.dev or cfg.test):
        raise HRKDError("data.custom sets both path and train/dev/test; keep either one file (path) or per-split files")
    if cfg.path:
        return {"all": Path(cfg.path).expanduser()}
    if not cfg.train:
        raise HRKDError("data.custom has no data: set data.custom.path (one file) or data.custom.train (+ dev, test)")
    given = {"train": cfg.train, "dev": cfg.dev, "test": cfg.test}
    return {split: Path(p).expanduser() if p else None for split, p in given.items()}


def build_custom(cfg: CustomData) -> tuple[dict[str, dict[str, pd.DataFrame]], list[str], list[str], str]:
    """Per-domain splits, the ordered labels and domains, and the source description."""
    files = _files(cfg)
    tables = {name: load_rows(path, cfg) for name, path in files.items() if path is not None}
    every = pd.concat(list(tables.values()), ignore_index=True)

    available = sorted(set(every["domain"]))
    if cfg.domains:
        unknown = [d for d in cfg.domains if d not in available]
        if unknown:
            raise HRKDError(f"data.custom.domains names {unknown}, not found in the data; available domains: {available}")
        domains = list(cfg.domains)
    else:
        domains = available
    for domain in domains:
        check_domain_name(domain)

    kept = every[every["domain"].isin(domains)]
    if cfg.labels:
        labels = [str(label) for label in cfg.labels]
        unknown = sorted(set(kept["label_name"]) - set(labels))
        if unknown:
            raise HRKDError(
                f"unknown label(s) {unknown[:5]} in the data; data.custom.labels allows only {labels}: add them there"
            )
    else:
        labels = default_labels(kept["label_name"].tolist())
    if len(labels) < 2:
        raise HRKDError(f"the data has only the label(s) {labels}; a classification task needs at least two")
    label_ids = {name: i for i, name in enumerate(labels)}

    out: dict[str, dict[str, pd.DataFrame]] = {}
    for domain in domains:
        parts = {name: t[t["domain"] == domain] for name, t in tables.items()}
        out[domain] = _split_domain(domain, parts, label_ids, cfg)
        log.info("custom/%s: %s", domain, {s: len(f) for s, f in out[domain].items()})
    source = ", ".join(str(p) for p in files.values() if p is not None)
    return out, labels, domains, source


def _frame(rows: pd.DataFrame, label_ids: dict[str, int], text_pair: bool) -> pd.DataFrame:
    return make_frame(
        rows["uid"].tolist(),
        rows["text"].tolist(),
        rows["text_pair"].tolist() if text_pair else None,
        [label_ids[v] for v in rows["label_name"]],
    )


def _split_domain(
    domain: str, parts: dict[str, pd.DataFrame], label_ids: dict[str, int], cfg: CustomData
) -> dict[str, pd.DataFrame]:
    pair = cfg.text_pair_column is not None
    # Given split files keep their row order; splits carved out of a file are seeded and stratified.
    source = parts.get("all", parts.get("train"))
    given = {s: _frame(parts[s], label_ids, pair) for s in SPLITS if s in parts and s != "train"}
    need = [s for s in ("dev", "test") if s not in given]
    if not need and "train" in parts:
        given["train"] = _frame(parts["train"], label_ids, pair)
        empty = [s for s in SPLITS if given[s].empty]
        if empty:
            raise HRKDError(f"domain '{domain}' has no rows in the {empty} file(s); add some or drop the domain")
        return {s: given[s] for s in SPLITS}
    sizes = carve_sizes(len(source), cfg.dev_fraction, cfg.test_fraction, need, f"domain '{domain}'")
    ids = [label_ids[v] for v in source["label_name"]]
    rows = stratified_split(ids, source["row"].tolist(), sizes, cfg.seed, f"custom/{domain}")
    out = dict(given)
    for split, idx in rows.items():
        out[split] = _frame(source.iloc[idx], label_ids, pair)
    empty = [s for s in SPLITS if out[s].empty]
    if empty:
        raise HRKDError(f"domain '{domain}' has no rows in split(s) {empty}; add data or drop the domain")
    return {s: out[s] for s in SPLITS}
