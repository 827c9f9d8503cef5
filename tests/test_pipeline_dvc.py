"""The DVC promise without training anything: which stages a change invalidates.

The repository's dvc.yaml and params.yaml are copied into a scratch DVC repository, every code
dependency is copied in, every output is faked with a tiny file, and ``dvc commit`` records a
dvc.lock for all of them, as if `dvc repro` had run. Then:

* the pipeline is up to date (``dvc status`` is empty);
* a report-only setting (``report.alpha``) invalidates the report stage and nothing else;
* ``lr`` (the `dvc exp run -S lr=5e-4` of the README) invalidates every distillation stage,
  few-shot included, and reaches the report downstream, but no data, teacher or few-shot teacher
  stage;
* the report reads only outputs of other stages, lists every module of hrkd/report/ it runs, and
  the declared metrics and plots are outputs.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from fakepipe import family, repo_at, status_of

REPO = Path(__file__).resolve().parents[1]
# Families of stages a student-lr change must rerun / must leave alone.
STUDENTS = {"distill", "distill_tinybert", "distill_fewshot", "distill_fewshot_tinybert"}
UPSTREAM = {"prepare", "fewshot", "pretrained", "train_teacher", "train_teacher_fewshot"}


def test_faked_pipeline_is_up_to_date(scratch):
    assert status_of(scratch) == set()


def test_report_setting_reruns_only_the_report(scratch):
    assert status_of(scratch, **{"report.alpha": 0.05, "report.case_study.examples": 3}) == {"report"}


def test_student_lr_reruns_students_and_report_but_not_data_or_teachers(scratch):
    changed = status_of(scratch, lr=5.0e-4)
    families = {family(s) for s in changed}
    assert STUDENTS <= families, f"lr must rerun every distillation family; changed: {sorted(families)}"
    assert not families & UPSTREAM and "report" not in families
    every = {name for name in (scratch / "stages.txt").read_text().split() if family(name) in STUDENTS}
    assert every <= changed  # every seed, rate and method, not just some
    # Downstream: the students rewrite their metrics files, which the report depends on, so
    # `dvc repro` reruns it after them; nothing upstream of the students depends on the report.
    import networkx as nx

    with repo_at(scratch) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        by_name = {s.addressing: s for s in graph.nodes}
        below_report = {s.addressing for s in nx.descendants(graph, by_name["report"])}
    assert changed <= below_report


def test_report_reads_only_outputs_and_lists_its_modules(scratch):
    from dvc.dependency.param import ParamsDependency

    with repo_at(scratch) as repo:
        stages = {s.addressing: s for s in repo.index.stages}
        outs = [str(o.def_path) for s in stages.values() for o in s.outs]
        report = stages["report"]
        deps = [str(d.def_path) for d in report.deps if not isinstance(d, ParamsDependency)]
    data_deps = [d for d in deps if not d.startswith(("hrkd/", "pipeline/"))]
    for dep in data_deps:  # a parent of other stages' outputs (or one of them), never a raw input
        assert any(o == dep or o.startswith(dep + "/") for o in outs if not o.startswith("reports")), dep
    modules = {f"hrkd/report/{p.name}" for p in (REPO / "hrkd" / "report").glob("*.py")} - {"hrkd/report/readme.py"}
    assert modules | {"hrkd/report/paper_values.yaml"} <= set(deps)
    assert all(o.startswith("reports/") for o in (str(o.def_path) for o in report.outs))


def test_declared_metrics_and_plots_are_outputs(scratch):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    text = (REPO / "dvc.yaml").read_text()
    with repo_at(scratch) as repo:
        outs = [o for s in repo.index.stages for o in s.outs]
    metric_files = {str(o.def_path) for o in outs if o.is_metric}
    # Every metrics file is its stage's declared metric (what `dvc metrics show/diff` and
    # `dvc exp show` read) and cached, so it travels with the run-cache and `dvc push`.
    assert "reports/summary.json" in metric_files
    assert {str(o.def_path) for o in outs if str(o.def_path).startswith("metrics/")} <= metric_files
    assert all(o.use_cache for o in outs)
    plot_files = []
    for entry in spec["plots"]:
        (name, body), = entry.items() if isinstance(entry, dict) else ((entry, None),)
        plot_files += list(body["y"]) if isinstance(body, dict) and "y" in body else [name]
    for path in plot_files:
        # training curves live in DVCLive folders (runs/live/...), figures in reports/figures/
        assert path.startswith(("runs/live/", "reports/figures/")), path
        assert path.split("/plots/")[0].rsplit("/", 1)[0] in text or path.startswith("reports/figures/")


def test_no_stage_depends_on_the_frozen_raw_import(scratch):
    """data.dvc's archive is absent until `dvc update data.dvc`: a stage depending on it (or on a
    folder holding it) would make a fresh clone's `dvc repro` fail, as it once did for `data/`."""
    from dvc.dependency.param import ParamsDependency

    raw = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]["path"]
    with repo_at(scratch) as repo:
        deps = {(s.addressing, str(d.def_path)) for s in repo.index.stages for d in s.deps
                if not isinstance(d, ParamsDependency)}
    offending = [(stage, dep) for stage, dep in deps if raw == dep or raw.startswith(dep.rstrip("/") + "/")]
    assert not offending, offending
