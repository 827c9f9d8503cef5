"""Dispatch one task of params.yaml to its source and write it in the on-disk format."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from hrkd.config import AMAZON_LABELS, MNLI_LABELS, AmazonData, CustomData, MnliData, Params, RowCaps
from hrkd.data.amazon import build_amazon
from hrkd.data.custom import build_custom
from hrkd.data.demo import build_demo
from hrkd.data.format import TaskMeta, write_task
from hrkd.data.mnli import build_mnli

log = logging.getLogger("hrkd.data.prepare")


def prepare_task(params: Params, task: str, out_dir: str | Path) -> TaskMeta:
    """Build ``task`` from its source (or the demo corpus) and write it atomically to ``out_dir``.

    In the demo profile the built-in kinds (mnli, amazon) are replaced by the generated corpus
    with the same domains and labels; custom tasks always read the user's files.
    """
    cfg = params.task(task)
    generated = params.profile == "demo" and isinstance(cfg, (MnliData, AmazonData))
    if generated:
        sizes = params.demo.mnli if cfg.kind == "mnli" else params.demo.amazon
        splits, labels, pair = build_demo(cfg.kind, cfg.domains, sizes, params.demo.seed)
        meta = TaskMeta(task, cfg.kind, labels, tuple(cfg.domains), pair, "demo", params.profile)
    elif isinstance(cfg, MnliData):
        splits, source = build_mnli(cfg)
        meta = TaskMeta(task, "mnli", MNLI_LABELS, tuple(cfg.domains), True, source, params.profile)
    elif isinstance(cfg, AmazonData):
        splits, source = build_amazon(cfg)
        meta = TaskMeta(task, "amazon", AMAZON_LABELS, tuple(cfg.domains), False, source, params.profile)
    else:
        assert isinstance(cfg, CustomData)
        splits, labels, domains, source = build_custom(cfg)
        pair = cfg.text_pair_column is not None
        meta = TaskMeta(task, "custom", tuple(labels), tuple(domains), pair, source, params.profile)
    if not generated:  # the demo corpus is sized by params.demo instead
        splits = cap_rows(splits, cfg.max_rows, task)
    stats = write_task(out_dir, meta, splits)
    for domain in meta.domains:
        entry = stats[domain]
        log.info("%s/%s: train %d, dev %d, test %d", task, domain, entry["train"], entry["dev"], entry["test"])
    log.info("wrote %s (%s, source %s)", out_dir, meta.kind, meta.source)
    return meta


def cap_rows(splits: dict[str, dict[str, pd.DataFrame]], caps: RowCaps, task: str) -> dict[str, dict[str, pd.DataFrame]]:
    """Keep the first ``caps.<split>`` rows of each domain's split (``data.<task>.max_rows``)."""
    out = {}
    for domain, frames in splits.items():
        out[domain] = {}
        for split, frame in frames.items():
            cap = getattr(caps, split)
            if cap is not None and cap < len(frame):
                log.info("%s/%s: keeping the first %d of %d %s rows (data.%s.max_rows.%s)",
                         task, domain, cap, len(frame), split, task, split)
                frame = frame.iloc[:cap].reset_index(drop=True)
            out[domain][split] = frame
    return out
