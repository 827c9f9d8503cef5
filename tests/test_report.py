"""Report stage: statistics by hand, exact table cells from synthetic metrics, figures, README splice."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml

from hrkd.config import parse_params
from hrkd.errors import HRKDError
from hrkd.io import write_json
from hrkd.report import tables as T
from hrkd.report.collect import Metrics, provenance
from hrkd.report.paper import PaperValues
from hrkd.report.readme import BEGIN, END, splice
from hrkd.report.stats import improvement_rate, mean_std, paired_t_test

REPO = Path(__file__).resolve().parents[1]
AMAZON = ["books", "dvd", "electronics", "kitchen"]
MNLI = ["fiction", "government", "slate", "telephone", "travel"]


# --- statistics ---------------------------------------------------------------------------------


def test_mean_std_by_hand():
    mean, std = mean_std([80.0, 82.0, 84.0, 86.0])
    assert mean == 83.0
    # sample std: sqrt(((-3)^2 + (-1)^2 + 1^2 + 3^2) / 3) = sqrt(20 / 3)
    assert std == pytest.approx(math.sqrt(20 / 3), abs=1e-12)
    assert mean_std([51.0]) == (51.0, None)
    with pytest.raises(HRKDError):
        mean_std([])


def test_paired_t_test_by_hand_and_against_scipy():
    from scipy import stats

    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 1.0, 3.0]
    # d = [1, 1, 2, 1]: mean 1.25, sd = sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5, t = 1.25 / (0.5 / 2) = 5
    res = paired_t_test(a, b, pairing="x", min_pairs=3)
    assert res.tested and res.n == 4 and res.df == 3
    assert res.mean_diff == 1.25 and res.t == pytest.approx(5.0, abs=1e-12)
    ref = stats.ttest_rel(a, b)
    assert res.t == pytest.approx(ref.statistic, abs=1e-12)
    assert res.p == pytest.approx(ref.pvalue, abs=1e-12)
    assert res.p == pytest.approx(2 * stats.t.sf(5.0, 3), abs=1e-12)  # ≈ 0.0154
    assert 0.015 < res.p < 0.016


def test_paired_t_test_refuses_too_few_pairs_and_constant_differences():
    few = paired_t_test([1.0, 2.0], [0.0, 0.5], pairing="per seed", min_pairs=3)
    assert not few.tested and few.p is None and "too few samples" in few.note and few.n == 2
    same = paired_t_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], pairing="x", min_pairs=3)
    assert not same.tested and "identical" in same.note
    shift = paired_t_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0], pairing="x", min_pairs=3)
    assert not shift.tested and shift.mean_diff == 1.0 and "same amount" in shift.note


def test_improvement_rate_is_relative_gain_in_percent():
    assert improvement_rate(55.0, 50.0) == pytest.approx(10.0)
    assert improvement_rate(45.0, 50.0) == pytest.approx(-10.0)
    with pytest.raises(HRKDError):
        improvement_rate(1.0, 0.0)


# --- synthetic pipeline outputs ---------------------------------------------------------------


def repo_params(**changes):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return parse_params(raw)


def write_task_meta(root: Path, task: str, kind: str, domains: list[str], sizes=(10, 5, 6), profile="demo"):
    folder = root / "data" / "prepared" / task
    labels = ["entailment", "neutral", "contradiction"] if kind == "mnli" else ["negative", "positive"]
    write_json(folder / "meta.json", {"task": task, "kind": kind, "labels": labels, "domains": domains,
                                      "text_pair": kind == "mnli", "source": "demo", "profile": profile})
    write_json(folder / "stats.json", {d: {"train": sizes[0] + i, "dev": sizes[1], "test": sizes[2], "label_counts": {}}
                                       for i, d in enumerate(domains)})


UNIFORM = {"uniform_layers": 3, "learned_layers": 0, "one_hot_layers": 0}
LEARNED = {"uniform_layers": 1, "learned_layers": 2, "one_hot_layers": 0}


def run_metrics(test: dict[str, float], ratios: bool = False, eval_regime: dict | None = None) -> dict:
    test = dict(test)
    test["average"] = round(sum(test.values()) / len(test), 6)
    out = {"dev": dict(test), "test": test, "step": {d: 1 for d in test if d != "average"}}
    if ratios:
        out["ratios"] = {"eval": {"mean_spread": 0.0, "mean_normalised_entropy": 1.0, "mean_max_abs_dev": 0.0,
                                  **(eval_regime or UNIFORM)},
                         "train_mode": {"mean_spread": 0.05, "mean_normalised_entropy": 0.99, "mean_max_abs_dev": 0.03,
                                        **LEARNED}}
    return out


# HRKD and its baseline on Amazon, three seeds: per-domain accuracies chosen for round means.
HRKD = {1: [0.80, 0.90, 0.90, 0.90], 2: [0.82, 0.90, 0.92, 0.92], 3: [0.84, 0.90, 0.94, 0.94]}
BASE = {1: [0.80, 0.88, 0.90, 0.86], 2: [0.80, 0.86, 0.90, 0.88], 3: [0.80, 0.88, 0.92, 0.88]}


def write_amazon_runs(root: Path, seeds=(1, 2, 3), metakd: bool = False):
    m = root / "metrics"
    for kind in ("single", "mix", "mtl", "hrkd"):
        write_json(m / "teachers" / f"amazon-{kind}.json", run_metrics(dict(zip(AMAZON, [0.9, 0.8, 0.9, 0.9]))))
    for seed in seeds:
        for run in ("single-tinybert-kd", "mix-tinybert-kd", "mtl-tinybert-kd", "no-self-attention", "no-comp-agg",
                    "no-hierarchical"):
            write_json(m / "students" / "amazon" / f"{run}-{seed}.json",
                       run_metrics(dict(zip(AMAZON, [0.7, 0.7, 0.7, 0.7])), ratios=run.startswith("no-")))
        write_json(m / "students" / "amazon" / f"hrkd-{seed}.json", run_metrics(dict(zip(AMAZON, HRKD[seed])), ratios=True))
        write_json(m / "students" / "amazon" / f"multi-domain-kd-{seed}.json", run_metrics(dict(zip(AMAZON, BASE[seed]))))
        write_json(m / "students" / "amazon" / f"hrkd-dro-{seed}.json",
                   run_metrics(dict(zip(AMAZON, [0.75] * 4)), ratios=True, eval_regime=LEARNED))
        if metakd:
            write_json(m / "students" / "amazon" / f"metakd-{seed}.json", run_metrics(dict(zip(AMAZON, [0.85] * 4))))


@pytest.fixture()
def amazon(tmp_path):
    write_task_meta(tmp_path, "amazon", "amazon", AMAZON)
    write_amazon_runs(tmp_path)
    params = repo_params(tasks=["amazon"], seeds=[1, 2, 3], **{"fewshot.tasks": [], "report.case_study.task": "amazon"})
    return Metrics(params, tmp_path)


def row(table, key):
    return next(r for r in table.rows if r.key == key)


def test_results_table_exact_cells(amazon):
    table = T.results_table(amazon, PaperValues.load(), "amazon")
    assert table.name == "table3_amazon" and table.title.startswith("Table 3: Results on Amazon Reviews")
    assert [r.label for r in table.rows] == [
        "BERT_B-single", "BERT_B-mix", "BERT_B-mtl", "Meta-teacher", "HRKD-teacher",
        "BERT_B-single →(TinyBERT-KD) BERT_S", "BERT_B-mix →(TinyBERT-KD) BERT_S", "BERT_B-mtl →(TinyBERT-KD) BERT_S",
        "Meta-teacher →(Meta-distillation) BERT_S", "HRKD-teacher →(TinyBERT-KD) BERT_S", "HRKD-teacher →(HRKD) BERT_S"]
    hrkd = row(table, "hrkd")
    # books: 80, 82, 84 -> 82.0 ± 2.00; the paper's 87.4 -> 82.0 - 87.4 = -5.4
    assert T.format_cell(hrkd.cells["books"], "acc", 1) == "82.0±2.00 [87.4, −5.4]"
    assert T.format_cell(hrkd.cells["dvd"], "acc", 1) == "90.0±0.00 [90.5, −0.5]"
    # average per seed: 87.5, 89.0, 90.5 -> 89.0 ± 1.50 vs the paper's 90.5
    assert T.format_cell(hrkd.cells["average"], "acc", 1) == "89.0±1.50 [90.5, −1.5]"
    teacher = row(table, "teacher-hrkd")
    assert T.format_cell(teacher.cells["dvd"], "acc", 1) == "80.0 [89.2, −9.2]" and teacher.runs == 1
    meta = row(table, "teacher-meta")
    assert meta.runs == 0 and T.format_cell(meta.cells["books"], "acc", 1) == "– [92.5]"
    assert any("Meta-KD teacher not built yet" in n for n in table.notes)
    header = provenance(amazon)
    assert header.startswith("profile: demo (demo numbers, NOT comparable")
    md = T.to_markdown(table, header, 1)
    assert md.splitlines()[0] == f"_{header}_"
    assert "| HRKD-teacher →(HRKD) BERT_S | `hrkd` | 82.0±2.00 [87.4, −5.4] |" in md
    lines = T.to_csv(table, header).splitlines()
    assert lines[0] == f"# {header}"
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[1:]))))
    assert len(rows) == len(table.rows)
    got = next(r for r in rows if r["run"] == "hrkd")
    assert (got["books"], got["books_std"], got["books_paper"], got["books_diff"]) == ("82.0000", "2.0000", "87.4000", "-5.4000")
    assert got["runs"] == "3"
    assert next(r for r in rows if r["run"] == "teacher-meta")["books"] == ""


def test_meta_kd_rows_are_picked_up_when_present(amazon, tmp_path):
    write_amazon_runs(tmp_path, metakd=True)
    write_json(tmp_path / "metrics" / "teachers" / "amazon-meta.json", run_metrics(dict(zip(AMAZON, [0.9] * 4))))
    table = T.results_table(amazon, PaperValues.load(), "amazon")
    assert T.format_cell(row(table, "metakd").cells["books"], "acc", 1) == "85.0±0.00 [91.5, −6.5]"
    assert row(table, "teacher-meta").runs == 1 and not any("Meta-KD" in n for n in table.notes)


def test_missing_required_metrics_names_the_stage(amazon, tmp_path):
    (tmp_path / "metrics" / "students" / "amazon" / "hrkd-2.json").unlink()
    with pytest.raises(HRKDError, match=r"hrkd-2.json not found: run `dvc repro distill@amazon-hrkd-2`"):
        T.results_table(amazon, PaperValues.load(), "amazon")


def test_ablation_table_rows_and_domain_rel_is_the_baseline(amazon):
    table = T.ablation_table(amazon, PaperValues.load(), "amazon")
    assert table.title.startswith("Table 4: Ablation studies on Amazon Reviews")
    assert [r.label for r in table.rows] == ["HRKD", "− Self-attention", "− Comp-Agg", "− Hierarchical Rel.", "− Domain Rel.",
                                             "HRKD, robust ratios (not in the paper)"]
    dro = row(table, "hrkd-dro")
    assert T.format_cell(dro.cells["books"], "acc", 1) == "75.0±0.00"  # no paper value: not in the paper
    dom = row(table, "no-domain-rel")
    assert dom.second == "multi-domain-kd"
    # books of the baseline: 80, 80, 80 -> 80.0 ± 0.00; Table 4 prints 84.6
    assert T.format_cell(dom.cells["books"], "acc", 1) == "80.0±0.00 [84.6, −4.6]"


def test_dataset_table_counts_and_paper_diff(amazon):
    table = T.dataset_table(amazon, PaperValues.load())
    books = row(table, "amazon/books")
    assert T.format_cell(books.cells["train"], "count", 0) == "10 [1,631, −1,621]"
    assert T.format_cell(row(table, "amazon/kitchen").cells["train"], "count", 0) == "13 [1,613, −1,600]"


def test_significance_pairs_seeds_and_domain_seed_cells(amazon):
    res = T.significance(amazon, PaperValues.load(), "amazon", min_pairs=3)
    by_seed, by_cell = res.tests
    # per-seed averages: HRKD 87.5 / 89.0 / 90.5, baseline 86.0 / 86.0 / 87.0 -> d = 1.5, 3.0, 3.5
    assert by_seed.n == 3 and by_seed.mean_diff == pytest.approx(8 / 3)
    from scipy import stats

    ref = stats.ttest_rel([87.5, 89.0, 90.5], [86.0, 86.0, 87.0])
    assert by_seed.p == pytest.approx(ref.pvalue, rel=1e-9) and by_seed.t == pytest.approx(ref.statistic, rel=1e-9)
    assert by_cell.n == 12 and by_cell.df == 11
    assert res.diff == pytest.approx(8 / 3)
    assert T.verdict(by_seed, 0.1).startswith("significant at α=0.1 (HRKD better)")
    line = T.significance_lines([res], 0.1)[0]
    assert line.startswith("amazon: HRKD − multi-domain KD = +2.67 points")


def test_two_seeds_are_too_few_for_the_per_seed_test(tmp_path):
    write_task_meta(tmp_path, "amazon", "amazon", AMAZON)
    write_amazon_runs(tmp_path, seeds=(1, 2))
    params = repo_params(tasks=["amazon"], seeds=[1, 2], **{"fewshot.tasks": []})
    res = T.significance(Metrics(params, tmp_path), PaperValues.load(), "amazon", min_pairs=3)
    assert not res.tests[0].tested and "too few samples: n=2" in res.tests[0].note
    assert res.tests[1].tested and res.tests[1].n == 8


def write_fewshot(root: Path, rates=("0.02", "0.1"), seeds=(1, 2), metakd_at=("0.1",)):
    write_task_meta(root, "mnli", "mnli", MNLI)
    base = {"0.02": [0.40, 0.42], "0.1": [0.50, 0.50]}
    ours = {"0.02": [0.44, 0.46], "0.1": [0.52, 0.54]}
    for tag in rates:
        folder = root / "metrics" / "fewshot" / f"mnli-{tag}"
        write_json(root / "data" / "fewshot" / "mnli" / tag / "stats.json", {d: {"train": 2} for d in MNLI})
        for kind in ("single", "hrkd"):
            write_json(folder / f"teacher-{kind}.json", run_metrics(dict.fromkeys(MNLI, 0.6)))
        for i, seed in enumerate(seeds):
            write_json(folder / f"single-tinybert-kd-{seed}.json", run_metrics(dict.fromkeys(MNLI, base[tag][i])))
            write_json(folder / f"hrkd-{seed}.json", run_metrics(dict.fromkeys(MNLI, ours[tag][i])))
            if tag in metakd_at:
                write_json(folder / f"metakd-{seed}.json", run_metrics(dict.fromkeys(MNLI, 0.5)))


def test_fewshot_improvement_rates_and_figure(tmp_path):
    write_fewshot(tmp_path)
    params = repo_params(tasks=["mnli"], **{"fewshot.rates": [0.02, 0.1], "fewshot.seeds": [1, 2]})
    metrics = Metrics(params, tmp_path)
    points = T.fewshot_points(metrics, PaperValues.load())
    p2, p10 = points
    # 2%: base 41.0, HRKD 45.0 -> 100 * 4 / 41; the paper prints 10.1 at 2%
    assert p2.rates["hrkd"] == pytest.approx(100 * 4 / 41) and p2.paper == {"hrkd": 10.1}
    assert "metakd" not in p2.rates and p2.train_rows == 10
    # 10%: base 50.0, HRKD 53.0 -> 6.0 %; Meta-KD 50.0 -> 0.0 %
    assert p10.rates == pytest.approx({"hrkd": 6.0, "metakd": 0.0})
    table = T.fewshot_table(points)
    assert T.format_cell(row(table, "0.02").cells["rate-hrkd"], "acc", 1) == "9.8 [10.1, −0.3]"
    assert T.format_cell(row(table, "0.02").cells["metakd"], "acc", 1) == "–"
    from hrkd.report.figures import figure2

    png = figure2(points, provenance(metrics), tmp_path / "out" / "figure2.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    again = figure2(points, provenance(metrics), tmp_path / "out" / "again.png").read_bytes()
    assert again == data  # no timestamps or version strings: byte-identical reruns


def test_paper_values_file_matches_the_paper_text():
    """Spot-check the values file against the paper's table text (shared/papers/hrkd-paper.txt)."""
    paper = PaperValues.load()
    t3 = paper.results("table3", AMAZON)
    assert t3.row("hrkd") == {"books": 87.4, "dvd": 90.5, "electronics": 91.8, "kitchen": 92.2, "average": 90.5}
    assert t3.row("multi-domain-kd")["kitchen"] == 88.1
    t2 = paper.results("table2", MNLI)
    assert t2.row("hrkd")["telephone"] == 81.4 and t2.row("teacher-single")["average"] == 81.9
    assert paper.table1("mnli")["telephone"] == {"train": 75013, "dev": 8335, "test": 1966}
    # the paper's average spans all its domains: not comparable on a subset
    assert "average" not in paper.results("table3", AMAZON[:2]).row("hrkd")
    assert paper.results("table3", ["reviews"]) is None
    for table in ("table2", "table3", "table4"):
        for key, values in paper.data[table]["rows"].items():
            domains = [d for d in values if d != "average"]
            assert abs(sum(values[d] for d in domains) / len(domains) - values["average"]) < 0.11, (table, key)


def test_readme_splice_keeps_markers_and_refuses_without_them():
    text = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert splice(text, "new block") == f"intro\n{BEGIN}\nnew block\n{END}\noutro\n"
    with pytest.raises(HRKDError, match="markers"):
        splice("no markers here", "x")


def test_readme_blocks_of_two_profiles_are_filled_independently():
    from hrkd.report.readme import markers

    begin, end = markers("small")
    text = f"{BEGIN}\ndemo\n{END}\n{begin}\nold\n{end}\n"
    assert splice(text, "real", begin, end) == f"{BEGIN}\ndemo\n{END}\n{begin}\nreal\n{end}\n"
    assert splice(text, "new demo") == f"{BEGIN}\nnew demo\n{END}\n{begin}\nold\n{end}\n"


def test_summary_json_is_written_by_the_stage(tmp_path, monkeypatch):
    """End to end without a case study (no `hrkd` _relational state needed): files, summary, determinism."""
    write_task_meta(tmp_path, "amazon", "amazon", AMAZON)
    write_amazon_runs(tmp_path)
    params = repo_params(tasks=["amazon"], seeds=[1, 2, 3],
                         **{"fewshot.tasks": [], "distill.methods": ["multi-domain-kd", "no-self-attention"]})
    from hrkd.report.build import build_report

    build_report(params, root=tmp_path)
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert summary["amazon"]["students"]["multi-domain-kd"] == pytest.approx(86.3333, abs=1e-4)
    assert summary["amazon"]["teachers"]["hrkd"] == 87.5
    assert "hrkd" not in summary["amazon"]["students"]  # not in distill.methods: no row, no number
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "reports").rglob("*") if p.is_file())
    assert "reports/tables/table3_amazon.csv" in files and "reports/report.md" in files
    first = {f: (tmp_path / f).read_bytes() for f in files}
    build_report(params, root=tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in files} == first


# --- Tables 5-6 from a real (tiny) HRKD student --------------------------------------------------

WORDS = "the a cat dog sat on mat good bad film book plot great awful was is not very fun dull".split()


def save_hrkd_student(root: Path, domains: list[str], seed: int = 1) -> Path:
    """A tiny untrained HRKD objective saved exactly as a distill run saves `_relational/` (no teachers needed)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from hrkd.config import Distill
    from hrkd.distill.objective import KDObjective
    from hrkd.distill.ratios import save_relational
    from hrkd.models import MultiDomainBert

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS])}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=16)
    enc = root / "enc"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=16)).save_pretrained(enc)
    student = MultiDomainBert.from_pretrained(enc, num_labels=2, domains=domains)
    obj = KDObjective(student, None, num_domains=len(domains), method="hrkd", distill=Distill(),
                      teacher_layers=4, teacher_hidden=48)
    out = root / "models" / "students" / "amazon" / "hrkd" / str(seed) / "_relational"
    save_relational(obj, out, tok, {"domains": domains, "max_seq_len": 16})
    return out


def test_case_study_from_a_saved_hrkd_student(tmp_path):
    from hrkd.data.format import TaskMeta, make_frame, write_task
    from hrkd.report.case_study import case_csv, case_markdown, case_study, collapse_sentence
    from hrkd.report.figures import ratio_heatmap

    domains = ["books", "dvd"]
    splits = {}
    for i, d in enumerate(domains):
        texts = [" ".join(WORDS[(i + k + j) % len(WORDS)] for j in range(5)) for k in range(4)]
        frame = make_frame([f"{d}{k}" for k in range(4)], texts, None, [k % 2 for k in range(4)])
        splits[d] = {"train": frame, "dev": frame, "test": frame}
    meta = TaskMeta("amazon", "amazon", ("negative", "positive"), tuple(domains), False, "demo", "demo")
    write_task(tmp_path / "data" / "prepared" / "amazon", meta, splits)
    save_hrkd_student(tmp_path, domains)

    study = case_study(tmp_path, "amazon", 1, 2)
    assert [(r.case, r.domain, r.label) for r in study.rows] == [
        (1, "books", "negative"), (1, "dvd", "negative"), (2, "books", "positive"), (2, "dvd", "positive")]
    assert study.rows[2].text == splits["books"]["test"]["text"][1]
    assert len(study.rows[0].ratio) == 3 and [len(s) for s in study.rows[0].similarity] == [2, 3]  # m = 1, 2
    for case in study.ratios + study.ratios_dropout:  # r is a distribution over domains in every layer
        for layer in case:
            assert sum(layer) == pytest.approx(1.0, abs=1e-6)
    assert study.collapsed == (study.max_dev_eval < 1e-3)
    sentence = collapse_sentence(study, PaperValues.load().case_study())
    assert ("uniform" in sentence) == study.collapsed and "0.17-0.29" in sentence
    again = case_study(tmp_path, "amazon", 1, 2)
    assert again.ratios_dropout == study.ratios_dropout  # the dropout draw is seeded
    md = case_markdown(study, "profile: demo", PaperValues.load().case_study())
    assert md.startswith("_profile: demo_") and "| 1 | books | negative |" in md
    assert case_csv(study, "profile: demo").splitlines()[0] == "# profile: demo"
    png = ratio_heatmap(study, "profile: demo", tmp_path / "heat.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(HRKDError, match="only 4 test rows"):
        case_study(tmp_path, "amazon", 1, 5)
    with pytest.raises(HRKDError, match=r"run `dvc repro distill@amazon-hrkd-2`"):
        case_study(tmp_path, "amazon", 2, 1)


def test_diagnostics_table_states_each_hrkd_runs_regime(amazon):
    table = T.diagnostics_table(amazon)
    runs = [r.second for r in table.rows]
    assert runs == [f"{m} seed {s}" for m in ("hrkd", "no-self-attention", "no-comp-agg", "no-hierarchical", "hrkd-dro")
                    for s in (1, 2, 3)]
    hrkd, dro = row(table, "hrkd"), row(table, "hrkd-dro")
    assert hrkd.texts == {"eval.regime": "uniform (3/0/0)", "train_mode.regime": "learned (1/2/0)"}
    assert dro.texts["eval.regime"] == "learned (1/2/0)"
    md = T.to_markdown(table, "", 1)
    assert "eval: regime" in md and "uniform (3/0/0)" in md
    assert T._regime_text({"mean_spread": 0.0}) == "uniform (all layers)"  # metrics from before the counts
    assert T._regime_text({"mean_spread": 0.1}) == "n/a (rerun the stage)"


def test_teacher_gap_is_student_minus_its_own_teacher(amazon):
    paper = PaperValues.load()
    results, ablations = T.results_table(amazon, paper, "amazon"), T.ablation_table(amazon, paper, "amazon")
    gap = T.teacher_gap_table(results, ablations, "amazon")
    assert [r.second for r in gap.rows] == ["single-tinybert-kd", "mix-tinybert-kd", "mtl-tinybert-kd", "metakd",
                                            "multi-domain-kd", "hrkd", "no-self-attention", "no-comp-agg",
                                            "no-hierarchical", "hrkd-dro"]
    # single teacher books 90, its TinyBERT-KD students 70: -20.0; HRKD books 82 vs the HRKD-teacher's 90: -8.0
    assert T.format_cell(row(gap, "single-tinybert-kd").cells["books"], "diff", 1) == "−20.0"
    assert T.format_cell(row(gap, "hrkd").cells["books"], "diff", 1) == "−8.0"
    assert row(gap, "hrkd").cells["average"].value == pytest.approx(
        row(results, "hrkd").cells["average"].value - row(results, "teacher-hrkd").cells["average"].value)
    assert T.format_cell(row(gap, "metakd").cells["books"], "diff", 1) == "–"  # no Meta-KD run in this fixture
