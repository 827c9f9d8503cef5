"""The train_teacher stage on a tiny demo task: every kind, determinism, resume, outputs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from hrkd.config import parse_params
from hrkd.data.loading import load_task
from hrkd.engine import Runtime
from hrkd.io import read_json
from hrkd.driver import RunPaths
from hrkd.teachers import train_teacher
from helpers import stop_at

REPO = Path(__file__).resolve().parents[1]


def tiny_params(**teacher_overrides):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tasks"] = ["amazon"]
    raw["fewshot"]["tasks"] = []
    raw["demo"]["amazon"] = {"train": 48, "dev": 12, "test": 12}
    raw["models"].update(vocab_size=200, teacher={"hidden_size": 16, "num_hidden_layers": 2,
                                                  "num_attention_heads": 2, "intermediate_size": 32},
                         student={"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "intermediate_size": 16})
    raw["engine"].update(device="cpu", progress=False)
    demo = raw["profiles"]["demo"]
    demo["max_seq_len"] = 24
    demo["teacher"].update(epochs=2, batch_size=8, lr=3e-3, eval_every=3, eval_batch_size=16, **teacher_overrides)
    return parse_params(raw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prepared demo data + tiny pretrained encoders, built once through the real stage code."""
    from hrkd.data.prepare import prepare_task
    from hrkd.models import load_tokenizer
    from hrkd.models.pretrained import build_pretrained

    root = tmp_path_factory.mktemp("teachers")
    params = tiny_params()
    prepare_task(params, "amazon", root / "data" / "amazon")
    build_pretrained(params, root / "data", root / "pretrained")
    tokenizer = load_tokenizer(root / "pretrained" / "teacher")
    task = load_task(root / "data" / "amazon", tokenizer, params.active.max_seq_len)
    return {"root": root, "params": params, "tokenizer": tokenizer, "task": task}


def run(world, kind, out: Path, params=None, stop_at_step=None, **kw):
    torch.set_num_threads(1)
    if stop_at_step is not None:
        kw["callbacks"] = [stop_at(stop_at_step)]
    paths = RunPaths(out=out / "model", metrics=out / "metrics.json", live=out / "live", resume=out / "resume")
    metrics = train_teacher(kind=kind, task=world["task"], params=params or world["params"],
                            pretrained=world["root"] / "pretrained" / "teacher", tokenizer=world["tokenizer"],
                            runtime=Runtime(device=torch.device("cpu")), paths=paths, **kw)
    return metrics, paths


@pytest.mark.parametrize("kind", ["single", "mix", "mtl", "hrkd"])
def test_every_kind_writes_per_domain_classifiers_and_metrics(world, tmp_path, kind):
    from transformers import AutoModelForSequenceClassification

    metrics, paths = run(world, kind, tmp_path)
    domains = world["task"].domains
    assert set(metrics["test"]) == set(domains) | {"average"}
    assert metrics == read_json(paths.metrics)
    assert metrics["test"]["average"] == pytest.approx(sum(metrics["test"][d] for d in domains) / len(domains), abs=1e-6)
    for d in domains:
        model = AutoModelForSequenceClassification.from_pretrained(paths.out / d)
        assert model.config.id2label == {0: "negative", 1: "positive"}
        meta = read_json(paths.out / d / "hrkd.json")
        assert meta["kind"] == kind and meta["domain"] == d and meta["selected_step"] == metrics["step"][d]
    assert not (paths.out / "_shared").exists()  # only written when distillation asks for it
    # A finished stage keeps no resume state at all (not a DVC output: the run-cache stays usable).
    assert not paths.resume.exists()
    # DVCLive curves for `dvc plots`
    live = paths.live / ("books" if kind == "single" else "")
    assert (live / "plots" / "metrics" / "train" / "loss.tsv").is_file()


def test_selected_checkpoint_reproduces_its_dev_accuracy(world, tmp_path):
    """The saved per-domain classifier is the checkpoint whose dev accuracy was recorded."""
    from hrkd.models import MultiDomainBert
    from hrkd.driver import domain_accuracy

    metrics, paths = run(world, "hrkd", tmp_path)
    task = world["task"]
    for i, d in enumerate(task.domains):
        model = MultiDomainBert.from_classifier(paths.out / d)
        dev = domain_accuracy(model, _single_domain(task, d), "dev", 0, 16, Runtime(device=torch.device("cpu")), False)
        assert dev == pytest.approx(metrics["dev"][d])


def _single_domain(task, domain):
    return type(task)(name=task.name, labels=task.labels, domains=[domain], splits={domain: task.splits[domain]})


def test_same_seed_same_metrics(world, tmp_path):
    a, _ = run(world, "mtl", tmp_path / "a")
    b, _ = run(world, "mtl", tmp_path / "b")
    assert a == b


def test_interrupted_run_resumes_to_the_uninterrupted_result(world, tmp_path):
    full, _ = run(world, "hrkd", tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(world, "hrkd", tmp_path / "run", stop_at_step=5)  # the state of step 3 is on disk
    assert (tmp_path / "run" / "resume" / "state.pt").is_file()
    assert not (tmp_path / "run" / "model").exists()  # no half-written output
    resumed, _ = run(world, "hrkd", tmp_path / "run")
    assert resumed == full


def test_shared_checkpoint_written_when_distillation_asks(world, tmp_path):
    raw = copy.deepcopy(world["params"].model_dump())
    raw["distill"]["teacher_checkpoint"] = "shared"
    params = parse_params(raw)
    _, paths = run(world, "mix", tmp_path, params=params)
    for d in world["task"].domains:
        assert read_json(paths.out / "_shared" / d / "hrkd.json")["selection"] == "average dev accuracy"
