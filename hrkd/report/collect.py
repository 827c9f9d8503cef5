"""Where every number of the report comes from: the metrics files other stages declare as outputs.

The report never scans folders for runs. It asks params.yaml which runs the pipeline defines and
reads exactly their files: DVC leaves the outputs of removed stages (an old seed, an old rate) in
the workspace, and a scan would average them in. A run the pipeline defines but whose file is
missing is an error naming the stage to run; the Meta-KD rows are optional (their stages are
added separately) and show "–" until their files exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrkd.config import Params
from hrkd.errors import HRKDError
from hrkd.io import read_stage_json
from hrkd.registry import META_TEACHER, METAKD, student_stage

log = logging.getLogger("hrkd.report")

# The Meta-KD runs are optional: the report picks them up when present
# (metrics/teachers/<task>-meta.json, metrics/students/<task>/metakd-<seed>.json,
# metrics/fewshot/<task>-<rate>/metakd-<seed>.json).
META_RUN = METAKD
__all__ = ["META_RUN", "META_TEACHER", "Metrics", "RunMetrics", "profile_name", "provenance"]


@dataclass(frozen=True)
class RunMetrics:
    """Test (and dev) accuracies of one run, as fractions, keyed by domain and ``average``."""

    path: Path
    test: dict[str, float]
    dev: dict[str, float]
    ratios: dict[str, dict[str, float]] | None


def _read_run(path: Path, stage: str) -> RunMetrics:
    data = read_stage_json(path, stage)
    if not isinstance(data, dict) or not isinstance(data.get("test"), dict) or "average" not in data["test"]:
        raise HRKDError(f"{path} has no test accuracies ('test': {{domain: acc, 'average': acc}}); rerun `dvc repro -f {stage}`")
    return RunMetrics(path, dict(data["test"]), dict(data.get("dev", {})), data.get("ratios"))


class Metrics:
    """Reads the run metrics under ``root`` (the repository root) for one params.yaml."""

    def __init__(self, params: Params, root: str | Path = ".") -> None:
        self.params = params
        self.root = Path(root)

    # --- paths and stage names (the dvc.yaml conventions) --------------------------------------

    def teacher(self, task: str, kind: str, *, optional: bool = False) -> RunMetrics | None:
        path = self.root / "metrics" / "teachers" / f"{task}-{kind}.json"
        if optional and not path.is_file():
            return None
        return _read_run(path, f"train_teacher@{task}-{kind}")

    def student(self, task: str, run: str, seeds: list[int] | None = None, *, optional: bool = False) -> list[RunMetrics]:
        """Every seed of a student run (``single-tinybert-kd``, ``hrkd``, ...); optional runs keep the seeds found."""
        seeds = self.params.seeds if seeds is None else seeds
        out = []
        for seed in seeds:
            path = self.root / "metrics" / "students" / task / f"{run}-{seed}.json"
            if optional and not path.is_file():
                continue
            out.append(_read_run(path, student_stage(task, run, seed)))
        return out

    def fewshot_teacher(self, task: str, tag: str, kind: str) -> RunMetrics:
        path = self.root / "metrics" / "fewshot" / f"{task}-{tag}" / f"teacher-{kind}.json"
        return _read_run(path, f"train_teacher_fewshot@{task}-{tag}-{kind}")

    def fewshot_student(self, task: str, tag: str, run: str, *, optional: bool = False) -> list[RunMetrics]:
        out = []
        for seed in self.params.fewshot.seeds:
            path = self.root / "metrics" / "fewshot" / f"{task}-{tag}" / f"{run}-{seed}.json"
            if optional and not path.is_file():
                continue
            out.append(_read_run(path, student_stage(task, run, seed, tag)))
        return out

    def stats(self, task: str, fewshot_tag: str | None = None) -> dict[str, Any]:
        folder = (self.root / "data" / "prepared" / task if fewshot_tag is None
                  else self.root / "data" / "fewshot" / task / fewshot_tag)
        return read_stage_json(folder / "stats.json", f"prepare@{task}" if fewshot_tag is None else f"fewshot@{task}")

    def meta(self, task: str) -> dict[str, Any]:
        return read_stage_json(self.root / "data" / "prepared" / task / "meta.json", f"prepare@{task}")


def provenance(metrics: Metrics) -> str:
    """One line naming the profile and data source of the prepared tasks (first line of every table file).

    Read from the prepared data's meta.json (what the pipeline actually ran on), not from
    params.yaml, so a stale report can never claim a profile its numbers do not come from.
    """
    parts, profiles = [], set()
    for task in metrics.params.tasks:
        meta = metrics.meta(task)
        profiles.add(meta["profile"])
        source = meta["source"]
        parts.append(f"{task}: generated demo corpus" if source == "demo" else f"{task}: {source}")
    profile = "/".join(sorted(profiles))
    warning = " (demo numbers, NOT comparable with the paper's)" if profiles == {"demo"} else ""
    return f"profile: {profile}{warning}; data: {'; '.join(parts)}"


def profile_name(metrics: Metrics) -> str:
    return "/".join(sorted({metrics.meta(t)["profile"] for t in metrics.params.tasks}))
