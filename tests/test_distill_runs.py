"""End-to-end distillation runs (tiny BERTs, a few steps): outputs, reload, determinism, lr precedence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import yaml
from helpers import DOMAINS, LABELS, S_LAYERS, make_tokenizer, save_encoder, save_teacher, toy_task

from hrkd.config import StudentSettings, parse_params
from hrkd.data.loading import collate
from hrkd.distill.ratios import RELATIONAL_DIR, relational_ratios
from hrkd.distill.runs import distill_student, student_settings
from hrkd.registry import run_name
from hrkd.engine import Runtime
from hrkd.errors import HRKDError
from hrkd.io import read_json
from hrkd.driver import RunPaths
from helpers import stop_at

REPO = Path(__file__).resolve().parents[1]
SETTINGS = StudentSettings(epochs=1, batch_size=4, lr=1e-3, eval_every=2, eval_batch_size=8, warmup_ratio=0.0)


def params(**top):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["engine"].update(device="cpu", progress=False, log_every=1)
    raw.update(top)
    return parse_params(raw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tok = make_tokenizer()
    student = save_encoder(root / "student", 32, S_LAYERS, 1, len(tok))
    tenc = save_encoder(root / "tenc", 48, 4, 2, len(tok))
    kind = root / "teachers" / "hrkd"
    for i, d in enumerate(DOMAINS):
        save_teacher(tenc, kind / d, 10 + i, tok)
    save_teacher(tenc, kind, 20, tok, multi=True)
    return {"student": student, "teachers": kind, "tok": tok}


def run(world, out: Path, method: str, p=None, seed=1, stop_at_step=None, **kw):
    if stop_at_step is not None:
        kw["callbacks"] = [stop_at(stop_at_step)]
    paths = RunPaths(out=out / "model", metrics=out / "metrics.json", live=out / "live", resume=out / "resume")
    metrics = distill_student(
        method=method, teacher_kind="hrkd", task=toy_task(sizes=(9, 6)), params=p or params(), seed=seed,
        teacher_dir=world["teachers"], pretrained_student=world["student"], tokenizer=world["tok"],
        runtime=Runtime(device=torch.device("cpu")), paths=paths, settings=kw.pop("settings", SETTINGS), **kw,
    )
    return metrics, paths


def test_run_names():
    assert run_name("tinybert-kd", "mix") == "mix-tinybert-kd"
    assert run_name("hrkd", "hrkd") == "hrkd"
    assert run_name("multi-domain-kd", "mtl") == "mtl-multi-domain-kd"
    with pytest.raises(HRKDError, match="unknown distillation method"):
        run_name("tinybert", "hrkd")
    with pytest.raises(HRKDError, match="unknown teacher kind"):
        run_name("hrkd", "bogus")
    with pytest.raises(HRKDError, match=r"distils from the hrkd/single/mix/mtl teacher: use --teacher hrkd"):
        run_name("hrkd", "meta")


@pytest.mark.slow
def test_lr_precedence_reaches_the_student_settings(world, tmp_path):
    assert student_settings(params(), "amazon").lr == params().active.student.task_lr["amazon"]
    assert student_settings(params(), "amazon", fewshot=True).lr == params().active.student.fewshot_lr
    assert student_settings(params(lr=5e-4), "mnli").lr == 5e-4
    assert student_settings(params(lr=5e-4), "mnli", fewshot=True).lr == 5e-4
    # The run itself uses it (settings=None -> the profile's schedule with Params.student_lr).
    p = params(lr=5e-4)
    p = p.model_copy(update={"profiles": {**p.profiles, p.profile: p.active.model_copy(
        update={"student": p.active.student.model_copy(update={"epochs": 1, "batch_size": 8, "eval_every": 5})})}})
    _, paths = run(world, tmp_path, "tinybert-kd", p=p, settings=None)
    assert read_json(paths.out / "student.json")["lr"] == 5e-4
    assert read_json(paths.out / "books" / "hrkd.json")["settings"]["lr"] == 5e-4


@pytest.mark.slow
def test_tinybert_kd_run_writes_one_single_head_student_per_domain(world, tmp_path):
    metrics, paths = run(world, tmp_path, "tinybert-kd")
    assert set(metrics) == {"dev", "test", "step"} and set(metrics["test"]) == {*DOMAINS, "average"}
    assert read_json(paths.metrics) == metrics
    assert sorted(p.name for p in paths.out.iterdir()) == sorted([*DOMAINS, "student.json"])
    assert not paths.resume.exists()  # resume state is scratch: gone once the stage succeeded
    for d in DOMAINS:
        clf = transformers.pipeline("text-classification", model=str(paths.out / d), device="cpu")
        assert clf("the cat sat on the mat")[0]["label"] in LABELS
        assert read_json(paths.out / d / "hrkd.json")["method"] == "tinybert-kd"


@pytest.mark.slow
def test_multi_domain_kd_run(world, tmp_path):
    metrics, paths = run(world, tmp_path, "multi-domain-kd")
    assert "ratios" not in metrics and not (paths.out / RELATIONAL_DIR).exists()
    for d in DOMAINS:
        meta = read_json(paths.out / d / "hrkd.json")
        assert meta["domain"] == d and meta["selected_step"] == metrics["step"][d]
        clf = transformers.pipeline("text-classification", model=str(paths.out / d), device="cpu")
        assert clf("a very good film")[0]["label"] in LABELS
    assert (paths.live / "metrics.json").is_file()


@pytest.mark.slow
def test_hrkd_run_saves_graph_reloadable_without_teacher_and_is_deterministic(world, tmp_path):
    m1, p1 = run(world, tmp_path / "a", "hrkd")
    m2, p2 = run(world, tmp_path / "b", "hrkd")
    assert m1 == m2
    for d in DOMAINS:
        a = (p1.out / d / "model.safetensors").read_bytes()
        assert a == (p2.out / d / "model.safetensors").read_bytes()
    assert set(m1["ratios"]) == {"eval", "train_mode"}
    assert 0.0 <= m1["ratios"]["eval"]["mean_spread"] <= 1.0
    rel = p1.out / RELATIONAL_DIR
    assert (rel / "graph.pt").is_file() and read_json(rel / "relational.json")["graph"]["num_domains"] == 2
    task = toy_task(sizes=(9, 6))
    batches = {d: collate(task, "test", [(i, torch.arange(4))]) for i, d in enumerate(DOMAINS)}
    out = relational_ratios(p1.out, batches)  # the student folder; teachers not needed
    assert out["domains"] == DOMAINS and out["ratios"].shape == (S_LAYERS + 1, 2)
    torch.testing.assert_close(out["ratios"].sum(1), torch.ones(S_LAYERS + 1))
    assert [tuple(s.shape) for s in out["similarity"]] == [(2, m + 1) for m in range(S_LAYERS + 1)]
    for s in out["similarity"]:
        torch.testing.assert_close(s.sum(1), torch.ones(2))
    assert torch.equal(out["ratios"], relational_ratios(rel, list(batches.values()))["ratios"])


@pytest.mark.slow
def test_different_seed_changes_the_student(world, tmp_path):
    m1, p1 = run(world, tmp_path / "a", "multi-domain-kd", seed=1)
    _, p2 = run(world, tmp_path / "b", "multi-domain-kd", seed=2)
    assert (p1.out / "books" / "model.safetensors").read_bytes() != (p2.out / "books" / "model.safetensors").read_bytes()


def test_missing_teacher_fails_before_training(world, tmp_path):
    paths = RunPaths(out=tmp_path / "m", metrics=tmp_path / "x.json", live=None, resume=tmp_path / "r")
    with pytest.raises(HRKDError, match=r"dvc repro train_teacher@toy-mix"):
        distill_student(method="tinybert-kd", teacher_kind="mix", task=toy_task(), params=params(), seed=1,
                        teacher_dir=tmp_path / "none", pretrained_student=world["student"], tokenizer=world["tok"],
                        runtime=Runtime(device=torch.device("cpu")), paths=paths, settings=SETTINGS)
    assert not paths.out.exists()


@pytest.mark.slow
def test_interrupted_hrkd_run_resumes_to_the_same_result(world, tmp_path):
    full, pf = run(world, tmp_path / "full", "hrkd")
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "cut", "hrkd", stop_at_step=3)  # state saved at step 2
    assert not (tmp_path / "cut" / "model").exists()  # outputs appear whole or not at all
    resumed, pr = run(world, tmp_path / "cut", "hrkd")
    assert resumed == full
    assert (pf.out / "dvd" / "model.safetensors").read_bytes() == (pr.out / "dvd" / "model.safetensors").read_bytes()
    logged = pf.live / "plots" / "metrics" / "train"
    assert {"embd.tsv", "attn.tsv", "hidn.tsv", "pred.tsv", "ratio_spread.tsv", "ratio_entropy.tsv"} <= {
        p.name for p in logged.iterdir()}


@pytest.mark.slow
def test_cli_runs_a_stage_with_its_default_layout(world, tmp_path, monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    spec = importlib.util.spec_from_file_location("distill_cli", REPO / "pipeline" / "distill.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["engine"].update(device="cpu", progress=False)
    raw["tasks"] = ["amazon"]
    raw["fewshot"]["tasks"] = []
    raw["profiles"]["demo"]["max_seq_len"] = 16
    raw["profiles"]["demo"]["student"].update(epochs=1, batch_size=4, eval_every=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    from hrkd.data.format import TaskMeta, make_frame, write_task

    texts = ["the cat sat on the mat", "a very good film", "the plot was not fun", "dull book", "great dog"]
    frame = make_frame([f"u{i}" for i in range(5)], texts, None, [0, 1, 0, 0, 1])
    meta = TaskMeta(task="amazon", kind="amazon", labels=tuple(LABELS), domains=tuple(DOMAINS), text_pair=False,
                    source="test", profile="demo")
    write_task(tmp_path / "data" / "prepared" / "amazon", meta,
               {d: {split: frame for split in ("train", "dev", "test")} for d in DOMAINS})
    monkeypatch.chdir(tmp_path)
    teachers = world["teachers"].parent
    result = CliRunner().invoke(cli.app, ["--task", "amazon", "--method", "no-domain-rel", "--seed", "3",
                                          "--teachers", str(teachers), "--pretrained", str(world["student"])])
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "metrics/students/amazon/no-domain-rel-3.json")["test"]["average"] >= 0
    assert (tmp_path / "models/students/amazon/no-domain-rel/3/books/config.json").is_file()
    assert not (tmp_path / "runs/resume/students/amazon-no-domain-rel-3").exists()
    bad = CliRunner().invoke(cli.app, ["--task", "amazon", "--method", "hrkd", "--teacher", "single",
                                       "--teachers", str(teachers), "--pretrained", str(world["student"])])
    assert bad.exit_code == 2 and "dvc repro train_teacher@amazon-single" in bad.output
