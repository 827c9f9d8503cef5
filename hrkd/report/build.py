"""The report stage: every table, figure and the summary metric, written under ``reports/``.

Layout (all DVC outputs of the ``report`` stage)::

    reports/report.md        every table + figure links + the significance and collapse sentences
    reports/summary.json     per-method average test accuracy etc. (a DVC metric: `dvc metrics diff`)
    reports/tables/<name>.md, <name>.csv     Tables 1-4, figure2, significance, ratio_diagnostics, case_study
    reports/figures/figure2.png, case_study_ratios.png

Inputs are only outputs of other stages: metrics/, data/prepared/*/{meta,stats}.json and test
rows, data/fewshot/*/<rate>/stats.json and the HRKD student's ``_relational/`` folder. Nothing
here depends on the clock, so a rerun on the same inputs writes the same bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hrkd.config import Params
from hrkd.io import atomic_dir, atomic_file, write_json
from hrkd.report import tables as T
from hrkd.report.collect import META_RUN, Metrics, profile_name, provenance
from hrkd.report.paper import PaperValues

log = logging.getLogger("hrkd.report")

TABLES_DIR = "tables"
FIGURES_DIR = "figures"
FIGURE2 = "figure2.png"
HEATMAP = "case_study_ratios.png"


@dataclass
class Report:
    header: str
    profile: str
    tables: list[T.Table]
    markdown: dict[str, str]  # table name -> Markdown
    significance: list[T.Significance]
    fewshot: list[T.FewShotPoint]
    case: Any | None  # CaseStudy
    summary: dict[str, Any]
    alpha: float
    notes: list[str] = field(default_factory=list)


def collect(params: Params, root: str | Path = ".") -> Report:
    """Read every input and build the tables (no files written)."""
    metrics = Metrics(params, root)
    paper = PaperValues.load()
    header = provenance(metrics)
    decimals = params.report.decimals
    tables: list[T.Table] = [T.dataset_table(metrics, paper)]
    results = {task: T.results_table(metrics, paper, task) for task in params.tasks}
    tables += results.values()
    # Table 4 is Amazon's; the other tasks' ablations follow as extras.
    for task in sorted(params.tasks, key=lambda t: metrics.meta(t)["kind"] != "amazon"):
        tables.append(T.ablation_table(metrics, paper, task))
    for task in params.tasks:
        ablations = next(t for t in tables if t.name == f"table4_{task}")
        tables.append(T.teacher_gap_table(results[task], ablations, task))
    sig = [T.significance(metrics, paper, task, params.report.min_pairs) for task in params.tasks]
    tables.append(T.significance_table(sig, params.report.alpha))
    points = T.fewshot_points(metrics, paper) if params.fewshot.tasks else []
    if points:
        tables.append(T.fewshot_table(points))
    notes: list[str] = []
    if any(m in params.distill.methods for m in T.HRKD_METHODS):
        tables.append(T.diagnostics_table(metrics))
    case = _case_study(params, root, notes)
    markdown = {t.name: T.to_markdown(t, header, decimals) for t in tables}
    if case is not None:
        from hrkd.report.case_study import case_markdown

        markdown["case_study"] = case_markdown(case, header, paper.case_study())
    summary = _summary(params, tables, sig, points)
    return Report(header, profile_name(metrics), tables, markdown, sig, points, case, summary, params.report.alpha, notes)


def _case_study(params: Params, root: str | Path, notes: list[str]):
    from hrkd.report.case_study import case_study

    if "hrkd" not in params.distill.methods:
        notes.append("No case study: 'hrkd' is not in distill.methods.")
        return None
    task = params.report.case_study.task
    if task not in params.tasks:
        notes.append(f"report.case_study.task '{task}' is not in tasks {params.tasks}; the case study uses '{params.tasks[0]}'.")
        task = params.tasks[0]
    study = case_study(root, task, params.seeds[0], params.report.case_study.examples)
    if notes and notes[-1].startswith("report.case_study.task"):
        study.note = notes[-1]
    return study


def _summary(params: Params, tables: list[T.Table], sig: list[T.Significance], points: list[T.FewShotPoint]) -> dict[str, Any]:
    """The compact metric for `dvc metrics diff`: average test accuracy (%) of every method, mean over seeds."""
    out: dict[str, Any] = {}
    by_name = {t.name: t for t in tables}
    for task in params.tasks:
        table = next(t for t in tables if t.name.endswith(f"_{task}") and not t.name.startswith("table4"))
        entry: dict[str, Any] = {"teachers": {}, "students": {}}
        for row in table.rows:
            value = row.cells["average"].value
            if value is None:
                continue
            if row.second.startswith("teacher-"):
                entry["teachers"][row.second.removeprefix("teacher-")] = round(value, 4)
            else:
                entry["students"][row.second] = round(value, 4)
        ablations = by_name.get(f"table4_{task}")
        for row in ablations.rows if ablations else []:
            if row.cells["average"].value is not None and row.second not in entry["students"]:
                entry["students"][row.second] = round(row.cells["average"].value, 4)
        res = next(s for s in sig if s.task == task)
        if res.diff is not None:
            entry["hrkd_minus_multi_domain_kd"] = round(res.diff, 4)
        for test, key in zip(res.tests, ("p_per_seed", "p_per_domain_seed")):
            if test.tested:
                entry[key] = round(test.p, 6)
        out[task] = entry
    if points:
        few: dict[str, Any] = {}
        for p in points:
            cell = {run: round(v[0], 4) for run, v in p.students.items()}
            cell.update({f"improvement_rate_{run}": round(v, 4) for run, v in p.rates.items()})
            few.setdefault(p.task, {})[p.tag] = cell
        out["fewshot"] = few
    return out


def _report_md(rep: Report) -> str:
    lines = ["# HRKD reproduction report", "", f"_{rep.header}_", "",
             "Generated by the `report` stage (`pipeline/report.py`) from the pipeline's outputs; do not edit. "
             "Accuracies are test accuracies in %; students are averaged over seeds. Where the paper has a value it is "
             "shown in brackets with the difference ours − paper. How to read it: docs/report.md.", ""]
    if rep.profile == "demo":
        lines += ["**Demo profile: a generated corpus and tiny random BERTs. These numbers test the pipeline; they are "
                  "not comparable with the paper's.**", ""]
    elif rep.profile == "small":
        lines += ["**Small profile: real data (see Table 1 for the rows kept) and small pre-trained checkpoints "
                  "(MiniLM) sized for a CPU. The methods are compared on equal terms, but the absolute numbers are "
                  "not the paper's scale (BERT-base teachers, TinyBERT students, full splits).**", ""]
    demote = lambda md: md.replace("\n### ", "\n## ", 1)  # noqa: E731
    order = [t.name for t in rep.tables if t.name not in ("significance", "figure2", "ratio_diagnostics")]
    for name in order:
        lines.append(demote(_strip_header(rep.markdown[name])))
    lines += ["## Significance", ""] + [f"- {s}" for s in T.significance_lines(rep.significance, rep.alpha)] + [""]
    lines.append(_strip_header(rep.markdown["significance"]))
    if rep.fewshot:
        lines += ["## Figure 2: few-shot learning", "", f"![Figure 2]({FIGURES_DIR}/{FIGURE2})", ""]
        lines.append(_strip_header(rep.markdown["figure2"]))
    if rep.case is not None:
        lines += ["## Tables 5-6: case study", "", f"![Case study ratios]({FIGURES_DIR}/{HEATMAP})", ""]
        lines.append(_strip_header(rep.markdown["case_study"]))
    if "ratio_diagnostics" in rep.markdown:
        lines.append(_strip_header(rep.markdown["ratio_diagnostics"]))
    lines += [f"- {n}" for n in rep.notes]
    return "\n".join(lines).rstrip() + "\n"


def _strip_header(md: str) -> str:
    """Drop the provenance line of a table file (report.md states it once at the top)."""
    lines = md.split("\n")
    return "\n".join(lines[2:]) if lines and lines[0].startswith("_profile:") else md


def write_report(rep: Report, out_dir: str | Path = "reports") -> list[Path]:
    """Write every output atomically: the two folders are replaced whole, the files one by one."""
    out = Path(out_dir)
    by_name = {t.name: t for t in rep.tables}
    with atomic_dir(out / TABLES_DIR) as tmp:
        for name, md in rep.markdown.items():
            (tmp / f"{name}.md").write_text(md, encoding="utf-8")
            if name in by_name:
                (tmp / f"{name}.csv").write_text(T.to_csv(by_name[name], rep.header), encoding="utf-8")
        if rep.case is not None:
            from hrkd.report.case_study import case_csv

            (tmp / "case_study.csv").write_text(case_csv(rep.case, rep.header), encoding="utf-8")
    with atomic_dir(out / FIGURES_DIR) as tmp:
        from hrkd.report.figures import figure2, ratio_heatmap

        if rep.fewshot:
            figure2(rep.fewshot, rep.header, tmp / FIGURE2)
        if rep.case is not None:
            ratio_heatmap(rep.case, rep.header, tmp / HEATMAP)
    with atomic_file(out / "report.md") as handle:
        handle.write(_report_md(rep))
    write_json(out / "summary.json", rep.summary)
    written = sorted(p for p in out.rglob("*") if p.is_file())
    log.info("wrote %d report files under %s (%s)", len(written), out, rep.header)
    return written


def build_report(params: Params, root: str | Path = ".", out_dir: str | Path = "reports") -> Report:
    rep = collect(params, root)
    write_report(rep, Path(root) / out_dir if not Path(out_dir).is_absolute() else out_dir)
    for line in T.significance_lines(rep.significance, params.report.alpha):
        log.info("significance %s", line)
    if not any(META_RUN in p.students for p in rep.fewshot):
        log.info("no Meta-KD few-shot runs found; Figure 2 shows HRKD only")
    return rep
