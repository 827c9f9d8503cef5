"""Tables 5-6: the trained HRKD student's ratios on a few test examples, one per domain.

The paper feeds one review per domain through the student and prints, per domain, the
domain-relational ratios r_{m,d} (m = 0..M) and the hierarchical similarity ratios α^H_{m,d}
(m = 1..M). Case k here takes the k-th test row of every domain (the first rows, not chosen by
hand) and recomputes both with :func:`hrkd.distill.relational_ratios` from the student's saved
``_relational/`` state, in eval mode, and once more with the graph's dropout on (as in training,
seeded) to show how much of any deviation from 1/D is dropout noise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrkd.data.format import read_meta, read_split
from hrkd.data.loading import collate, load_task
from hrkd.distill.ratios import relational_ratios
from hrkd.errors import HRKDError
from hrkd.io import read_json
from hrkd.models import load_tokenizer

log = logging.getLogger("hrkd.report")

COLLAPSE_TOL = 1e-3  # eval-mode max |r - 1/D| below this = collapsed (docs/hrkd-method.md)


@dataclass
class CaseRow:
    case: int
    domain: str
    label: str
    text: str
    text_pair: str | None
    ratio: list[float]  # r_{m,d}, m = 0..M (eval mode)
    similarity: list[list[float]]  # α^H_{m,d} for m = 1..M
    ratio_dropout: list[float]  # r_{m,d} with the graph's dropout on


@dataclass
class CaseStudy:
    task: str
    seed: int
    source: str  # the _relational folder read
    domains: list[str]
    rows: list[CaseRow]
    ratios: list[list[list[float]]]  # per case, r [M+1][D], eval mode
    ratios_dropout: list[list[list[float]]]
    max_dev_eval: float  # max |r - 1/D| over every case, eval mode
    max_dev_dropout: float
    note: str = ""

    @property
    def collapsed(self) -> bool:
        return self.max_dev_eval < COLLAPSE_TOL


def case_study(root: str | Path, task: str, seed: int, examples: int) -> CaseStudy:
    """Ratios of ``models/students/<task>/hrkd/<seed>/_relational`` on test rows 0..examples-1 of every domain."""
    import torch

    root = Path(root)
    rel = root / "models" / "students" / task / "hrkd" / str(seed) / "_relational"
    if not (rel / "relational.json").is_file():
        raise HRKDError(f"{rel} not found: run `dvc repro distill@{task}-hrkd-{seed}` before the report")
    saved = read_json(rel / "relational.json")
    data_dir = root / "data" / "prepared" / task
    meta = read_meta(data_dir)
    if list(saved["domains"]) != list(meta.domains):
        raise HRKDError(f"{rel} was trained on domains {saved['domains']} but {data_dir} has {list(meta.domains)}: "
                        f"rerun `dvc repro distill@{task}-hrkd-{seed}`")
    splits = load_task(data_dir, load_tokenizer(rel), int(saved["max_seq_len"]), splits=["test"])
    smallest = min(len(splits.splits[d]["test"]) for d in splits.domains)
    if examples > smallest:
        raise HRKDError(f"report.case_study.examples={examples} but a domain of {task} has only {smallest} test rows; lower it")
    frames = {d: read_split(data_dir, d, "test") for d in meta.domains}
    rows, ratios, ratios_dropout = [], [], []
    for k in range(examples):
        batches = [collate(splits, "test", [(i, torch.tensor([k]))]) for i in range(len(meta.domains))]
        out = relational_ratios(rel, batches)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(k)  # the dropout draw is part of the reported numbers: make it reproducible
            noisy = relational_ratios(rel, batches, graph_dropout=True)
        r, rd = out["ratios"], noisy["ratios"]
        ratios.append(r.tolist())
        ratios_dropout.append(rd.tolist())
        for i, domain in enumerate(meta.domains):
            row = frames[domain].iloc[k]
            pair = row["text_pair"]
            rows.append(CaseRow(k + 1, domain, meta.labels[int(row["label"])], str(row["text"]),
                                None if pair is None or pair != pair else str(pair),
                                r[:, i].tolist(), [s[i].tolist() for s in out["similarity"][1:]], rd[:, i].tolist()))
    d = len(meta.domains)
    dev = lambda rs: max(abs(v - 1.0 / d) for case in rs for layer in case for v in layer)  # noqa: E731
    log.info("case study %s seed %d: %d cases, eval max |r-1/D| = %.2e, dropout-on %.2e",
             task, seed, examples, dev(ratios), dev(ratios_dropout))
    return CaseStudy(task, seed, str(rel.relative_to(root)), list(meta.domains), rows, ratios, ratios_dropout,
                     dev(ratios), dev(ratios_dropout))


def _vec(values: list[float], decimals: int = 3) -> str:
    return "[" + ", ".join(f"{v:.{decimals}f}" for v in values) + "]"


def _short(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def paper_ratio_range(paper: dict[str, list[dict[str, Any]]]) -> tuple[float, float, float] | None:
    """(min r, max r, max |r - 1/4|) over the paper's Tables 5-6 (D = 4)."""
    values = [v for rows in paper.values() for r in rows for v in r["ratio"]]
    if not values:
        return None
    return min(values), max(values), max(abs(v - 0.25) for v in values)


def collapse_sentence(study: CaseStudy, paper: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """The honest reading of the case study (docs/hrkd-method.md, "Ratio collapse")."""
    d = len(study.domains)
    if study.collapsed:
        head = (f"In eval mode the trained student's domain-relational ratios are uniform: r = 1/D = {1 / d:.3f} in every "
                f"layer and domain (max |r − 1/D| = {study.max_dev_eval:.1e}). This is the ratio collapse of "
                "docs/hrkd-method.md: when one of a layer graph's two GAT layers has all its scores a^T[Wh_i ⊕ Wh_j] on one "
                "side of the LeakyReLU kink, every node gets the same attention row and the same output, so eq. 10 gives "
                "r = 1/D; eq. 17 is then multi-domain KD (eq. 5) with every layer term divided by D.")
    else:
        head = (f"In eval mode the ratios differ from uniform by up to {study.max_dev_eval:.3f} (max |r − 1/D|): the "
                "graph has not collapsed here: both GAT layers of some layer graph straddle the LeakyReLU kink (possible for "
                "m ≥ 1 through eq. 16's per-domain layer choice, or with `distill.graph_skip`; docs/hrkd-method.md).")
    tail = (f" With the graph's dropout on, as during training, they move by up to {study.max_dev_dropout:.3f} — noise "
            "that changes with every dropout draw for the same input.")
    span = paper_ratio_range(paper or {})
    if span:
        tail += (f" The paper's Tables 5-6 ratios lie in {span[0]:.2f}-{span[1]:.2f} (max |r − 0.25| = {span[2]:.2f}, "
                 "D = 4), the order of dropout noise at BERT scale (docs/hrkd-method.md); that does not prove, but "
                 "cannot rule out, that they show noise rather than learned relations.")
    return head + tail


def case_markdown(study: CaseStudy, header: str, paper: dict[str, list[dict[str, Any]]]) -> str:
    m = len(study.rows[0].ratio) - 1 if study.rows else 0
    lines = [f"_{header}_", "",
             f"### Tables 5-6 (case study): ratios of the HRKD student on {study.task} test examples", "",
             (f"Student `{study.source}` (seed {study.seed}). Case k = the k-th test row of every domain, fed together as "
              f"one example per domain. Domain-relational ratio = r_{{m,d}} for m = 0..{m} (embedding layer, then "
              f"student layers 1..{m}); hierarchical similarity ratio = α^H_{{m,d}} for m = 1..{m} (m+1 values each, "
              "eq. 16); both in eval mode. The last column is r with the graph's dropout on (seeded), as in training."), "",
             "| Case | Domain | Label | Text | Domain-relational ratio | Hierarchical similarity ratio | r with graph dropout |",
             "|---|---|---|---|---|---|---|"]
    for row in study.rows:
        text = row.text if row.text_pair is None else f"{row.text} ⟂ {row.text_pair}"
        sim = ", ".join(_vec(s, 2) for s in row.similarity)
        lines.append(f"| {row.case} | {row.domain} | {row.label} | {_short(text).replace('|', '/')} | "
                     f"{_vec(row.ratio)} | {sim} | {_vec(row.ratio_dropout)} |")
    lines += ["", collapse_sentence(study, paper)]
    if study.note:
        lines += ["", study.note]
    if paper:
        lines += ["", "For scale, the paper's Table 5 ratios (Amazon, TinyBERT-4, D = 4): "
                  + "; ".join(f"{r['domain']} {r['label']} {_vec(r['ratio'], 2)}" for r in paper.get("table5", [])) + "."]
    return "\n".join(lines) + "\n"


def case_csv(study: CaseStudy, header: str) -> str:
    import csv
    import io

    buf = io.StringIO()
    buf.write(f"# {header}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "domain", "label", "text", "text_pair", "ratio", "similarity", "ratio_dropout"])
    for row in study.rows:
        writer.writerow([row.case, row.domain, row.label, row.text, row.text_pair or "",
                         json.dumps([round(v, 6) for v in row.ratio]),
                         json.dumps([[round(v, 6) for v in s] for s in row.similarity]),
                         json.dumps([round(v, 6) for v in row.ratio_dropout])])
    return buf.getvalue()
