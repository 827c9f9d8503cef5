"""The README's N-GPU recipe, with real training on CPU: the grid split into queued experiments, one
per "GPU" (`-S engine.gpus=<k>`, tracked by no stage), run by two queue workers side by side; their
outputs meet again in the workspace through the shared cache, and equal a serial run's exactly.

The demo profile at its smallest (tiny random BERTs, a few dozen generated reviews, one epoch).
"""

from __future__ import annotations

import shutil

import pytest
import yaml

from fakepipe import REPO, clone, metrics_files, sh, wait_for_queue

pytestmark = pytest.mark.slow

STUDENTS = ["distill@amazon-hrkd-1", "distill@amazon-multi-domain-kd-1"]
UPSTREAM = ["prepare@amazon", "pretrained", "train_teacher@amazon-hrkd"]


def tiny_params() -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.update(tasks=["amazon"], seeds=[1])
    raw["fewshot"]["tasks"] = []
    raw["teacher"]["kinds"] = ["hrkd"]
    raw["distill"].update(tinybert_teachers=[], methods=["multi-domain-kd", "hrkd"])
    raw["demo"]["amazon"] = {"train": 32, "dev": 16, "test": 16}
    raw["engine"]["progress"] = False
    demo = raw["profiles"]["demo"]
    demo["max_seq_len"] = 32
    demo["teacher"].update(epochs=1, eval_every=1000)
    demo["student"].update(epochs=1, eval_every=1000)
    return raw


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    repo = root / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, repo / name)
    for tree in ("hrkd", "pipeline"):
        shutil.copytree(REPO / tree, repo / tree, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "pipeline")
    sh(repo, "dvc", "repro", *UPSTREAM)  # phase 1 of the recipe (teachers), here in the workspace
    return {"root": root, "repo": repo}


def test_two_queue_workers_give_the_serial_metrics_and_meet_in_the_workspace(grid):
    root, repo = grid["root"], grid["repo"]
    # The serial reference: its own copy of the cache as it stands (data and teacher, no students).
    shutil.copytree(repo / ".dvc" / "cache", root / "serial-cache")
    serial = clone(repo, root / "serial", cache=root / "serial-cache")
    out = sh(serial, "dvc", "repro", *STUDENTS)
    assert out.count("Running stage 'distill@") == 2 and "Running stage 'train_teacher" not in out
    expected = metrics_files(serial)

    # The recipe: one queued experiment per GPU, started together.
    for gpu, stage in enumerate(STUDENTS):
        sh(repo, "dvc", "exp", "run", "--queue", "-n", f"gpu{gpu}", "-S", f"engine.gpus={gpu}", stage)
    sh(repo, "dvc", "queue", "start", "-j", "2")
    status = wait_for_queue(repo, timeout_s=600)
    assert status.count("Success") == 2, status
    for gpu, stage in enumerate(STUDENTS):
        log = sh(repo, "dvc", "queue", "logs", f"gpu{gpu}")
        assert f"Running stage '{stage}'" in log
        # engine settings invalidate nothing: the teacher comes from the cache in every worker
        assert "Running stage 'train_teacher" not in log and "Running stage 'pretrained'" not in log, log[-2000:]

    # They meet again: the workspace restores both students from the run-cache, nothing trains.
    out = sh(repo, "dvc", "repro", *STUDENTS)
    assert "Running stage" not in out and out.count("is cached - skipping run") == 2, out
    got = metrics_files(repo)
    students = {k: v for k, v in expected.items() if k.startswith("metrics/students/")}
    assert len(students) == 2 and {k: got[k] for k in students} == students
