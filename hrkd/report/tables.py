"""Tables 1-4, the few-shot table behind Figure 2, the significance test and the ratio diagnostics.

Each table is built as data (:class:`Table`) and rendered twice, to Markdown and to CSV, with the
same rows and columns as the paper. Accuracy cells hold ours (mean ± sample std over seeds, in %)
next to the paper's number and the difference ours - paper; runs the pipeline does not have
(Meta-KD until its stages exist, a teacher kind left out of params) are "–" with a note.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

from hrkd.data.fewshot import rate_tag
from hrkd.errors import HRKDError
from hrkd.registry import GRAPH_METHODS, METHODS, TEACHERS, parse_run_name
from hrkd.relational import DIAGNOSTIC_KEYS, UNIFORM_SPREAD, regime_of_counts
from hrkd.report.collect import META_RUN, META_TEACHER, Metrics, RunMetrics
from hrkd.report.paper import PaperValues
from hrkd.report.stats import PairedTest, improvement_rate, mean_std, paired_t_test

TITLES = {"mnli": "MNLI", "amazon": "Amazon Reviews"}
RESULTS_TABLE = {"mnli": "table2", "amazon": "table3"}
HRKD_METHODS = GRAPH_METHODS
BASELINE = "multi-domain-kd"  # HRKD-teacher -TinyBERT-KD-> BERT_S, the row HRKD is tested against


@dataclass
class Cell:
    value: float | None  # ours (%, a count or a statistic); None = run not available
    std: float | None = None
    paper: float | None = None


@dataclass
class Row:
    label: str  # first column (method, dataset, task)
    second: str  # second column (our run name, domain, pairing, rate)
    key: str  # row id shared with paper_values.yaml
    cells: dict[str, Cell]
    runs: int = 0  # how many runs (seeds) the cells average; 0 = not available
    note: str = ""
    texts: dict[str, str] = field(default_factory=dict)  # text columns (e.g. the t-test verdict)


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    # acc: % with std and paper/diff; count: integer with paper/diff; int: plain integer;
    # stat: a statistic (4 significant digits); diff: a signed difference in points; text: row.texts[key]
    fmt: str = "acc"


@dataclass
class Table:
    name: str  # file stem under reports/tables/
    title: str
    first: tuple[str, str]  # headers of the two label columns
    columns: list[Column]
    rows: list[Row]
    legend: str = ""
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Rows of Tables 2-4
# ---------------------------------------------------------------------------------------------


def _student_label(teacher: str, method: str) -> str:
    return f"{teacher} →({method}) BERT_S"


def _student_row(run: str) -> tuple[str, str]:
    method, teacher = parse_run_name(run)
    return run, _student_label(TEACHERS[teacher].label, METHODS[method].arrow)


# Row order as in the paper's tables; names and labels from hrkd.registry.
TEACHER_ROWS = [(f"teacher-{k}", TEACHERS[k].label, k) for k in ("single", "mix", "mtl", META_TEACHER, "hrkd")]
STUDENT_ROWS = [_student_row(r) for r in ("single-tinybert-kd", "mix-tinybert-kd", "mtl-tinybert-kd", META_RUN,
                                          "multi-domain-kd", "hrkd")]
ABLATION_ROWS = [(m, METHODS[m].label, m) for m in ("hrkd", "no-self-attention", "no-comp-agg", "no-hierarchical",
                                                     "no-domain-rel", "hrkd-dro", "hrkd-frozen")]


EXTENSION_RUNS = frozenset(m for m, v in METHODS.items() if v.extension)  # Table 4 rows that are not in the paper


def _pct(x: float) -> float:
    return 100.0 * x


def _accuracy_row(key: str, label: str, run: str, runs: list[RunMetrics], columns: list[Column],
                  paper: dict[str, float], note: str = "") -> Row:
    cells: dict[str, Cell] = {}
    for col in columns:
        if runs:
            missing = [str(r.path) for r in runs if col.key not in r.test]
            if missing:
                raise HRKDError(f"{missing[0]} has no test accuracy for '{col.key}': rerun its stage (domains changed?)")
            mean, std = mean_std([_pct(r.test[col.key]) for r in runs])
        else:
            mean, std = None, None
        cells[col.key] = Cell(mean, std, paper.get(col.key))
    return Row(label, run, key, cells, len(runs), note)


def _domain_columns(domains: list[str]) -> list[Column]:
    return [Column(d, "DVD" if d == "dvd" else d.capitalize()) for d in domains] + [Column("average", "Average")]


def results_table(metrics: Metrics, paper: PaperValues, task: str) -> Table:
    """Tables 2 (MNLI) and 3 (Amazon): teachers, then students (mean ± std over seeds)."""
    params = metrics.params
    meta = metrics.meta(task)
    cols = _domain_columns(list(meta["domains"]))
    table_id = RESULTS_TABLE.get(meta["kind"])
    ref = paper.results(table_id, list(meta["domains"])) if table_id else None
    rows: list[Row] = []
    for key, label, kind in TEACHER_ROWS:
        note = ""
        if kind == META_TEACHER:
            run = metrics.teacher(task, kind, optional=True)
            if run is None:
                note = f"Meta-KD teacher not built yet (expects metrics/teachers/{task}-{kind}.json)"
        elif kind in params.teacher.kinds:
            run = metrics.teacher(task, kind)
        else:
            run, note = None, f"teacher kind '{kind}' not in teacher.kinds"
        rows.append(_accuracy_row(key, label, f"teacher-{kind}", [run] if run else [], cols,
                                  ref.row(key) if ref else {}, note))
    for run_name, label in STUDENT_ROWS:
        if run_name == META_RUN:
            runs = metrics.student(task, run_name, optional=True)
            note = "" if runs else f"Meta-KD students not built yet (expects metrics/students/{task}/{META_RUN}-<seed>.json)"
            if runs and len(runs) < len(params.seeds):
                note = f"only {len(runs)} of {len(params.seeds)} seeds found"
        elif parse_run_name(run_name)[0] == "tinybert-kd":
            teacher = parse_run_name(run_name)[1]
            runs = metrics.student(task, run_name) if teacher in params.distill.tinybert_teachers else []
            note = "" if runs else f"'{teacher}' not in distill.tinybert_teachers"
        else:
            runs = metrics.student(task, run_name) if run_name in params.distill.methods else []
            note = "" if runs else f"method '{run_name}' not in distill.methods"
        rows.append(_accuracy_row(run_name, label, run_name, runs, cols, ref.row(run_name) if ref else {}, note))
    legend = _accuracy_legend(ref is not None, len(params.seeds))
    if ref is not None and ref.std_text():
        legend += f" The paper's ± (its only stds): {ref.std_text()}."
    number = {"table2": "Table 2", "table3": "Table 3"}.get(table_id or "", "Results (Tables 2-3 layout)")
    return Table(f"{table_id}_{task}" if table_id else f"results_{task}",
                 f"{number}: Results on {TITLES.get(meta['kind'], task)} ({task}), test accuracy (%)",
                 ("Method", "run"), cols, rows, legend=legend, notes=_row_notes(rows))


def ablation_table(metrics: Metrics, paper: PaperValues, task: str) -> Table:
    """Table 4 (Amazon) and the same ablations on any other task (MNLI: an extra, not in the paper)."""
    params = metrics.params
    meta = metrics.meta(task)
    cols = _domain_columns(list(meta["domains"]))
    ref = paper.results("table4", list(meta["domains"])) if meta["kind"] == "amazon" else None
    rows = []
    for key, label, run in ABLATION_ROWS:
        if run in EXTENSION_RUNS and run not in params.distill.methods:
            continue  # our variants appear only when run
        if run == "no-domain-rel" and run not in params.distill.methods:
            run = BASELINE  # the same computation (docs/distill.md): Table 4's row equals Table 3's baseline
        runs = metrics.student(task, run) if run in params.distill.methods else []
        note = "" if runs else f"method '{run}' not in distill.methods"
        rows.append(_accuracy_row(key, label, run, runs, cols, ref.row(key) if ref else {}, note))
    if ref is None:
        title = (f"Table 4 (extra, not in the paper): Ablation studies on {TITLES.get(meta['kind'], task)} "
                 f"({task}), test accuracy (%)")
    else:
        title = f"Table 4: Ablation studies on Amazon Reviews ({task}), test accuracy (%)"
    notes = _row_notes(rows) + ["− Domain Rel. = `multi-domain-kd` (eq. 5), the same computation as `no-domain-rel` "
                                "(docs/distill.md), i.e. the HRKD-teacher →(TinyBERT-KD) row of Tables 2-3."]
    return Table(f"table4_{task}", title, ("KD Method", "run"), cols, rows,
                 legend=_accuracy_legend(ref is not None, len(params.seeds)), notes=notes)


def _teacher_row_of(run: str) -> str:
    """The teacher row a student run was distilled from (its row key in Tables 2-3)."""
    return f"teacher-{parse_run_name(run)[1]}"


def teacher_gap_table(results: Table, ablations: Table, task: str) -> Table:
    """Each student's distance from the teacher it was distilled from: student mean − teacher, points.

    Built from Tables 2-3 and 4 as rendered, so it can never disagree with them.
    """
    teachers = {r.key: r for r in results.rows if r.key.startswith("teacher-")}
    students = [r for r in results.rows if not r.key.startswith("teacher-")]
    seen = {r.second for r in students}
    students += [r for r in ablations.rows if r.second not in seen]
    cols = [Column(c.key, c.header, "diff") for c in results.columns]
    rows = []
    for r in students:
        teacher = teachers.get(_teacher_row_of(r.second))
        cells = {}
        for c in cols:
            s, t = r.cells.get(c.key), teacher.cells.get(c.key) if teacher else None
            ok = s is not None and t is not None and s.value is not None and t.value is not None
            cells[c.key] = Cell(s.value - t.value if ok else None)
        rows.append(Row(r.label, r.second, r.key, cells, r.runs,
                        note="" if teacher and r.runs else r.note or "teacher not available"))
    legend = ("Student test accuracy (mean over seeds) minus the test accuracy of the teacher it was distilled from "
              "(the row's teacher in Tables 2-3: TinyBERT-KD rows their teacher kind, Meta-distillation the "
              "Meta-teacher, every multi-domain method the HRKD-teacher), in points; negative = below the teacher.")
    return Table(f"teacher_gap_{task}", f"Students' distance from their teachers on {task} (points)",
                 ("Student", "run"), cols, rows, legend=legend)


def dataset_table(metrics: Metrics, paper: PaperValues) -> Table:
    """Table 1: per-domain split sizes of the prepared data (data/prepared/<task>/stats.json)."""
    rows = []
    any_paper = False
    for task in metrics.params.tasks:
        meta = metrics.meta(task)
        stats = metrics.stats(task)
        ref = paper.table1(meta["kind"])
        for domain in meta["domains"]:
            if domain not in stats:
                raise HRKDError(f"data/prepared/{task}/stats.json has no entry for domain '{domain}': "
                                f"rerun `dvc repro -f prepare@{task}`")
            theirs = ref.get(domain, {})
            any_paper |= bool(theirs)
            cells = {s: Cell(float(stats[domain][s]), None, _opt_float(theirs.get(s))) for s in ("train", "dev", "test")}
            rows.append(Row(TITLES.get(meta["kind"], task), domain, f"{task}/{domain}", cells, 1))
    legend = "Cell: our split size" + (" [the paper's, ours − paper]." if any_paper else ".")
    cols = [Column("train", "#Train", "count"), Column("dev", "#Dev", "count"), Column("test", "#Test", "count")]
    return Table("table1", "Table 1: Statistics of the datasets", ("Dataset", "Domain"), cols, rows, legend=legend)


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _accuracy_legend(has_paper: bool, n_seeds: int) -> str:
    text = (f"Cell: ours, test accuracy in %; students: mean ± sample std (ddof 1) over seeds "
            f"(params `seeds`: {n_seeds}); teachers: one run.")
    if has_paper:
        text += " In brackets: [the paper's value, ours − paper]."
    return text


def _row_notes(rows: list[Row]) -> list[str]:
    missing = [f"{r.label}: {r.note}" for r in rows if r.runs == 0 and r.note]
    partial = [f"{r.label}: {r.note}" for r in rows if r.runs and r.note]
    notes = (["– = no such run in this pipeline. " + "; ".join(missing) + "."] if missing else [])
    return notes + partial


# ---------------------------------------------------------------------------------------------
# Significance: HRKD vs HRKD-teacher -TinyBERT-KD-> BERT_S
# ---------------------------------------------------------------------------------------------


@dataclass
class Significance:
    task: str
    diff: float | None  # mean over seeds of (HRKD - baseline) average accuracy, points
    tests: list[PairedTest]
    note: str = ""
    paper: str = ""


PAIR_SEED = "per seed (average accuracy)"
PAIR_CELL = "per (domain, seed) (pairs not independent)"


def significance(metrics: Metrics, paper: PaperValues, task: str, min_pairs: int) -> Significance:
    """Paired two-sided t-tests of HRKD against multi-domain KD (the pairing is argued in docs/report.md).

    * per seed: the average test accuracy of the two runs with the same seed (same student
      initialisation and data order), n = seeds: the run is the unit that was replicated;
    * per (domain, seed): every domain's test accuracy, n = domains x seeds. The domains of one
      run share one student, so these pairs are not independent and the p-value is optimistic.
    """
    params = metrics.params
    kind = metrics.meta(task)["kind"]
    if "hrkd" not in params.distill.methods or BASELINE not in params.distill.methods:
        return Significance(task, None, [], f"needs both 'hrkd' and '{BASELINE}' in distill.methods")
    ours = dict(zip(params.seeds, metrics.student(task, "hrkd")))
    base = dict(zip(params.seeds, metrics.student(task, BASELINE)))
    domains = list(metrics.meta(task)["domains"])
    a = [_pct(ours[s].test["average"]) for s in params.seeds]
    b = [_pct(base[s].test["average"]) for s in params.seeds]
    by_seed = paired_t_test(a, b, pairing=PAIR_SEED, min_pairs=min_pairs)
    a2 = [_pct(ours[s].test[d]) for s in params.seeds for d in domains]
    b2 = [_pct(base[s].test[d]) for s in params.seeds for d in domains]
    by_cell = paired_t_test(a2, b2, pairing=PAIR_CELL, min_pairs=min_pairs)
    diff = math.fsum(a) / len(a) - math.fsum(b) / len(b)
    return Significance(task, diff, [by_seed, by_cell], paper=paper.significance(kind))


def verdict(test: PairedTest, alpha: float) -> str:
    if not test.tested:
        return test.note
    direction = "HRKD better" if test.mean_diff > 0 else "HRKD worse"
    if test.p < alpha:
        return f"significant at α={alpha:g} ({direction})"
    return f"not significant at α={alpha:g} (observed: {direction})"


def significance_table(results: list[Significance], alpha: float) -> Table:
    cols = [Column("n", "n", "int"), Column("diff", "mean diff (points)", "stat"), Column("t", "t", "stat"),
            Column("df", "df", "int"), Column("p", "p (two-sided)", "stat"), Column("verdict", "verdict", "text"),
            Column("paper", "paper", "text")]
    rows = []
    for res in results:
        for test in res.tests:
            cells = {"n": Cell(float(test.n)), "diff": Cell(test.mean_diff), "t": Cell(test.t),
                     "df": Cell(None if test.df is None else float(test.df)), "p": Cell(test.p)}
            rows.append(Row(res.task, test.pairing, test.pairing, cells, test.n,
                            texts={"verdict": verdict(test, alpha), "paper": res.paper}))
        if not res.tests:
            rows.append(Row(res.task, "–", "–", {}, 0, texts={"verdict": res.note, "paper": res.paper}))
    legend = (f"HRKD minus its multi-domain TinyBERT-KD baseline (`hrkd` − `multi-domain-kd`, both from the "
              f"HRKD-teacher), test accuracy in points. α = {alpha:g} (params `report.alpha`; the paper: t-test, "
              "p < 0.1, pairing not stated). Why these pairings: docs/report.md.")
    return Table("significance", "Significance: HRKD vs HRKD-teacher →(TinyBERT-KD) BERT_S, paired t-test",
                 ("Task", "Pairing"), cols, rows, legend=legend)


def significance_lines(results: list[Significance], alpha: float) -> list[str]:
    """One sentence per task (README, report.md)."""
    lines = []
    for res in results:
        if not res.tests:
            lines.append(f"{res.task}: no test ({res.note}).")
            continue
        parts = []
        for test in res.tests:
            if test.tested:
                parts.append(f"{test.pairing}: t = {test.t:.2f}, df = {test.df}, p = {test.p:.3g} → {verdict(test, alpha)}")
            else:
                parts.append(f"{test.pairing}: {test.note}")
        lines.append(f"{res.task}: HRKD − multi-domain KD = {res.diff:+.2f} points (mean over seeds); " + "; ".join(parts) + ".")
    return lines


# ---------------------------------------------------------------------------------------------
# Few-shot (Figure 2)
# ---------------------------------------------------------------------------------------------

FEWSHOT_BASE = "single-tinybert-kd"
FEWSHOT_RUNS = ("hrkd", META_RUN)


@dataclass
class FewShotPoint:
    task: str
    tag: str
    rate: float
    train_rows: int  # training rows, summed over domains
    teachers: dict[str, float]  # kind -> average test accuracy (%)
    students: dict[str, tuple[float, float | None, int]]  # run -> (mean %, std, seeds)
    rates: dict[str, float]  # run -> improvement rate (%) over FEWSHOT_BASE
    paper: dict[str, float]  # run -> the paper's improvement rate (%), where it prints one


def fewshot_points(metrics: Metrics, paper: PaperValues) -> list[FewShotPoint]:
    points = []
    for task in metrics.params.fewshot.tasks:
        kind = metrics.meta(task)["kind"]
        for rate in metrics.params.fewshot.rates:
            tag = rate_tag(rate)
            rows = sum(int(v["train"]) for v in metrics.stats(task, tag).values())
            teachers = {k: _pct(metrics.fewshot_teacher(task, tag, k).test["average"]) for k in ("single", "hrkd")}
            base = metrics.fewshot_student(task, tag, FEWSHOT_BASE)
            base_mean, base_std = mean_std([_pct(r.test["average"]) for r in base])
            students = {FEWSHOT_BASE: (base_mean, base_std, len(base))}
            rates = {}
            for run in FEWSHOT_RUNS:
                runs = metrics.fewshot_student(task, tag, run, optional=run == META_RUN)
                if runs:
                    mean, std = mean_std([_pct(r.test["average"]) for r in runs])
                    students[run] = (mean, std, len(runs))
                    rates[run] = improvement_rate(mean, base_mean)
            points.append(FewShotPoint(task, tag, rate, rows, teachers, students, rates, paper.figure2(kind, rate)))
    return points


def fewshot_table(points: list[FewShotPoint]) -> Table:
    cols = [Column("rows", "train rows (all domains)", "int"), Column("teacher-single", "BERT_B-single"),
            Column("teacher-hrkd", "HRKD-teacher"), Column(FEWSHOT_BASE, "BERT_B-single →(TinyBERT-KD) BERT_S"),
            Column("hrkd", "HRKD-teacher →(HRKD) BERT_S"), Column("rate-hrkd", "HRKD improvement rate (%)"),
            Column(META_RUN, "Meta-teacher →(Meta-distillation) BERT_S"), Column("rate-metakd", "Meta-KD improvement rate (%)")]
    rows = []
    for p in points:
        cells = {"rows": Cell(float(p.train_rows)),
                 "teacher-single": Cell(p.teachers["single"]), "teacher-hrkd": Cell(p.teachers["hrkd"])}
        for run in (FEWSHOT_BASE, "hrkd", META_RUN):
            mean, std, _ = p.students.get(run, (None, None, 0))
            cells[run] = Cell(mean, std)
        for run in FEWSHOT_RUNS:
            cells[f"rate-{run}"] = Cell(p.rates.get(run), None, p.paper.get(run))
        rows.append(Row(p.task, f"{100 * p.rate:g}%", p.tag, cells, p.students[FEWSHOT_BASE][2]))
    notes = [] if any(META_RUN in p.students for p in points) else [
        f"Meta-KD columns: – until the Meta-KD few-shot runs exist (metrics/fewshot/<task>-<rate>/{META_RUN}-<seed>.json)."]
    legend = ("Improvement rate = 100 × (A − A_base) / A_base, with A = test accuracy averaged over domains, then over "
              "seeds (`fewshot.seeds`), and base = BERT_B-single →(TinyBERT-KD) BERT_S at the same rate. Teachers and "
              "students see only the few-shot training rows; dev and test are the full splits. In brackets: "
              "[the paper's improvement rate, ours − paper] where its text gives one (Figure 2's bars are not printed).")
    return Table("figure2", "Figure 2 data: few-shot learning, average test accuracy (%) and improvement rate",
                 ("Task", "Sample rate"), cols, rows, legend=legend, notes=notes)


# ---------------------------------------------------------------------------------------------
# Ratio diagnostics of the HRKD-method students (the collapse check of docs/hrkd-method.md)
# ---------------------------------------------------------------------------------------------

DIAG_KEYS = tuple(DIAGNOSTIC_KEYS.items())
DIAG_MODES = (("eval", "eval"), ("train_mode", "dropout-on"))


def _regime_text(diag: dict[str, float]) -> str:
    if "one_hot_layers" not in diag:
        # Metrics written before the counts existed: a zero mean spread still means every layer is 1/D.
        return "uniform (all layers)" if diag["mean_spread"] < UNIFORM_SPREAD else "n/a (rerun the stage)"
    counts = {k: int(diag[k]) for k in ("uniform_layers", "learned_layers", "one_hot_layers")}
    return f"{regime_of_counts(counts)} ({counts['uniform_layers']}/{counts['learned_layers']}/{counts['one_hot_layers']})"


def diagnostics_table(metrics: Metrics) -> Table:
    cols = [Column(f"{mode}.{key}", f"{label}: {short}", "stat") for mode, label in DIAG_MODES for key, short in DIAG_KEYS]
    cols += [Column(f"{mode}.regime", f"{label}: regime", "text") for mode, label in DIAG_MODES]
    rows = []
    params = metrics.params
    for task in params.tasks:
        for run in HRKD_METHODS:
            if run not in params.distill.methods:
                continue
            for seed, rm in zip(params.seeds, metrics.student(task, run)):
                if not rm.ratios:
                    raise HRKDError(f"{rm.path} has no 'ratios' diagnostics: rerun `dvc repro -f distill@{task}-{run}-{seed}`")
                cells = {f"{mode}.{key}": Cell(float(rm.ratios[mode][key])) for mode, _ in DIAG_MODES for key, _ in DIAG_KEYS}
                texts = {f"{mode}.regime": _regime_text(rm.ratios[mode]) for mode, _ in DIAG_MODES}
                rows.append(Row(task, f"{run} seed {seed}", run, cells, 1, texts=texts))
    legend = ("r = domain-relational ratios of the selected student on the first `batch_size` dev rows of every domain "
              "(from the students' metrics files). spread = mean over layers of max_d r − min_d r; norm. entropy = "
              "entropy(r) / log D (1 = uniform); eval = graph dropout off; dropout-on = the graph in train mode, as in "
              "training (seeded). regime: uniform = every layer's spread below 1e-6 (r = 1/D: eq. 17 is eq. 5 / D); "
              "one-hot = some layer's normalised entropy below 0.2 (one domain holds ~95 % of it); learned = neither; "
              "in brackets the layers uniform/learned/one-hot. Training-time curves: `dvc plots show` (train/ratio/*).")
    return Table("ratio_diagnostics", "Ratio diagnostics of the HRKD-method students", ("Task", "Run"), cols, rows,
                 legend=legend)


# ---------------------------------------------------------------------------------------------
# Rendering: Markdown and CSV with the same rows and columns
# ---------------------------------------------------------------------------------------------


def _num(x: float, decimals: int) -> str:
    text = f"{x:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # never "-0.0"


def _signed(x: float, decimals: int) -> str:
    text = _num(x, decimals)
    return "−" + text[1:] if text.startswith("-") else "+" + text  # a real minus sign, as in the paper


def _stat(x: float) -> str:
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.2e}"


def format_cell(cell: Cell | None, fmt: str, decimals: int) -> str:
    """Markdown text of one cell, e.g. ``51.0±0.40 [80.9, −29.9]``, ``– [85.1]`` or ``473 [69,613, −69,140]``."""
    if cell is None or (cell.value is None and cell.paper is None):
        return "–"
    if fmt == "stat":
        return _stat(cell.value)
    if fmt == "int":
        return f"{int(cell.value):d}"
    if fmt == "diff":
        return "–" if cell.value is None else _signed(cell.value, decimals)
    if fmt == "count":
        ours = "–" if cell.value is None else f"{int(cell.value):,}"
        if cell.paper is None:
            return ours
        if cell.value is None:
            return f"{ours} [{int(cell.paper):,}]"
        diff = int(cell.value - cell.paper)
        return f"{ours} [{int(cell.paper):,}, {'−' if diff < 0 else '+'}{abs(diff):,}]"
    ours = "–" if cell.value is None else _num(cell.value, decimals)
    if cell.value is not None and cell.std is not None:
        ours += f"±{_num(cell.std, decimals + 1)}"  # one more digit for the std, as the paper prints
    if cell.paper is None:
        return ours
    if cell.value is None:
        return f"{ours} [{_num(cell.paper, decimals)}]"
    return f"{ours} [{_num(cell.paper, decimals)}, {_signed(cell.value - cell.paper, decimals)}]"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table, header: str, decimals: int, heading: str = "###") -> str:
    """The table as GitHub Markdown: provenance line, title, legend, table, notes."""
    cells_of = lambda row: [row.texts.get(c.key, "") if c.fmt == "text" else  # noqa: E731
                            format_cell(row.cells.get(c.key), c.fmt, decimals) for c in table.columns]
    second = lambda row: f"`{row.second}`" if table.first[1] == "run" else row.second  # noqa: E731
    lines = [f"_{header}_", "", f"{heading} {table.title}", ""]
    if table.legend:
        lines += [table.legend, ""]
    lines.append("| " + " | ".join(list(table.first) + [c.header for c in table.columns]) + " |")
    lines.append("|" + "---|" * (2 + len(table.columns)))
    for row in table.rows:
        lines.append("| " + " | ".join(_md(t) for t in [row.label, second(row)] + cells_of(row)) + " |")
    if table.notes:
        lines += [""] + [f"- {_md(n)}" for n in table.notes]
    return "\n".join(lines) + "\n"


def to_csv(table: Table, header: str) -> str:
    """CSV with the same rows and columns. Its first line, ``# <provenance>``, is a comment:
    read it with ``pandas.read_csv(path, comment="#")``. Accuracy and count columns expand to
    ``<col>, <col>_std, <col>_paper, <col>_diff`` (diff = ours - paper); numbers keep 4 decimals."""
    buf = io.StringIO()
    buf.write(f"# {header}\n")
    writer = csv.writer(buf, lineterminator="\n")
    head = [_snake(table.first[0]), _snake(table.first[1])]
    for c in table.columns:
        head += [c.key, f"{c.key}_std", f"{c.key}_paper", f"{c.key}_diff"] if c.fmt in ("acc", "count") else [c.key]
    writer.writerow(head + ["runs", "note"])
    for row in table.rows:
        out: list[Any] = [row.label, row.second]
        for c in table.columns:
            cell = row.cells.get(c.key)
            if c.fmt == "text":
                out.append(row.texts.get(c.key, ""))
            elif c.fmt in ("acc", "count"):
                value, std, ref = (None, None, None) if cell is None else (cell.value, cell.std, cell.paper)
                diff = None if value is None or ref is None else value - ref
                out += [_csv_num(value), _csv_num(std), _csv_num(ref), _csv_num(diff)]
            elif c.fmt == "int":
                out.append("" if cell is None or cell.value is None else str(int(cell.value)))
            else:
                out.append(_csv_num(None if cell is None else cell.value, stat=True))
        writer.writerow(out + [row.runs, row.note])
    return buf.getvalue()


def _snake(text: str) -> str:
    return text.lower().replace(" ", "_")


def _csv_num(x: float | None, stat: bool = False) -> str:
    if x is None:
        return ""
    if stat:
        return f"{x:.6g}"
    return _num(x, 4)
