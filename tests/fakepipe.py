"""This project's dvc.yaml in a scratch git + DVC repository, every stage's command replaced by a fake.

The fake (one script for every stage; DVC names the stage in ``DVC_STAGE``) writes each declared
output as a pure function of the stage's dependencies and tracked parameters, and appends the
stage's name to a log outside the repository. Everything DVC decides (what is up to date, what the
run-cache restores, what a queued experiment runs, what `exp apply` brings back) therefore plays out
exactly as with the real commands, in seconds, and the log says which stages ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

FAKE_STAGE = '''\
import hashlib, json, os
from pathlib import Path

import yaml

spec = json.loads(Path("fake_stages.json").read_text())
name = os.environ["DVC_STAGE"]
stage = spec["stages"][name]
h = hashlib.sha256(name.encode())
for dep in stage["deps"]:
    path = Path(dep)
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.as_posix().encode() + b"\\0" + f.read_bytes())
params = yaml.safe_load(Path("params.yaml").read_text())
for key in stage["params"]:
    node = params
    for part in key.split("."):
        node = node[part]
    h.update(key.encode() + json.dumps(node, sort_keys=True).encode())
digest = h.hexdigest()
value = round(int(digest[:8], 16) / 16**8, 6)


def put(path, text):
    """A file holding ``text``, or for a folder (no suffix) a file inside it."""
    path = path if path.suffix else path / "fake.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


for out, inside in stage["outs"].items():
    path = Path(out)
    put(path, json.dumps({"value": value}) + "\\n" if path.suffix == ".json" else digest + "\\n")
    for part in inside["parts"]:  # what other stages depend on inside this folder
        put(Path(part), digest + "\\n")
    for curve in inside["curves"]:  # the DVCLive files dvc.yaml's plots read
        tsv = Path(curve)
        put(tsv, f"step\\t{tsv.stem}\\n1\\t{value}\\n2\\t{value / 2}\\n")
with open(spec["log"], "a") as f:
    f.write(name + "\\n")
'''

# The smallest grid with every stage kind: 19 stages.
SMALL_GRID = {
    "tasks": ["mnli"],
    "seeds": [1],
    "fewshot": {"tasks": ["mnli"], "rates": [0.1], "seeds": [1]},
    "teacher": {"kinds": ["single", "hrkd"]},
    "distill": {"tinybert_teachers": ["single"], "methods": ["hrkd"]},
}
# The families a student-lr change reruns (with the report downstream), and the rest.
STUDENT_FAMILIES = {"distill", "distill_tinybert", "distill_metakd", "distill_fewshot", "distill_fewshot_tinybert",
                    "distill_fewshot_metakd"}


def family(stage: str) -> str:
    return stage.split("@", 1)[0]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def env() -> dict[str, str]:
    # Real stage commands call `python`: this interpreter's, offline.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def sh(root: Path, *cmd: str, stdout_only: bool = False) -> str:
    """Run a command in ``root`` (``dvc`` = this interpreter's DVC); its output, or fail naming it."""
    argv = [sys.executable, "-m", "dvc", *cmd[1:]] if cmd[0] == "dvc" else list(cmd)
    proc = subprocess.run(argv, cwd=root, env=env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


class Log:
    """Which stages ran: the fake appends each stage's name to one file shared by every workspace."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.touch()
        self._seen = 0

    def new(self) -> list[str]:
        lines = self.path.read_text().split()
        fresh, self._seen = lines[self._seen:], len(lines)
        return fresh


def build(root: Path, log: Path, grid: dict[str, Any] | None = None) -> list[str]:
    """Create the scratch repository at ``root`` (committed, nothing run); return its stage names."""
    root.mkdir(parents=True)
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for body in spec["stages"].values():
        (body["do"] if "do" in body else body)["cmd"] = f"{sys.executable} fake_stage.py"
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    _merge(params, SMALL_GRID if grid is None else grid)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # data.dvc too: a frozen import of a URL nothing here can reach, as on a fresh offline clone.
    for name in (".gitignore", ".dvcignore", "data.dvc"):
        shutil.copy(REPO / name, root / name)
    for tree in ("hrkd", "pipeline"):  # the code deps, so DVC hashes real files
        shutil.copytree(REPO / tree, root / tree, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "fake_stage.py").write_text(FAKE_STAGE)
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "config", "core.analytics", "false")
    stages = _describe(root, log)
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "pipeline")
    return stages


def _describe(root: Path, log: Path) -> list[str]:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    curves: list[str] = []
    for entry in spec.get("plots", []):
        if isinstance(entry, dict):
            (_, body), = entry.items()
            curves += list(body.get("y", {})) if isinstance(body, dict) else []
    cwd = os.getcwd()
    os.chdir(root)  # DVC resolves stage paths against the working directory
    try:
        with Repo(root) as repo:
            described = {}
            stages = [s for s in repo.index.stages if not s.frozen]  # data.dvc never runs
            every_dep = {str(d.def_path) for s in stages for d in s.deps if not isinstance(d, ParamsDependency)}
            for stage in stages:
                outs = {}
                for o in stage.outs:
                    inside = str(o.def_path) + "/"
                    outs[str(o.def_path)] = {"curves": [c for c in curves if c.startswith(inside)],
                                             "parts": sorted(d for d in every_dep if d.startswith(inside))}
                deps = [str(d.def_path) for d in stage.deps if not isinstance(d, ParamsDependency)]
                keys = [k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params]
                described[stage.addressing] = {"outs": outs, "deps": deps, "params": keys}
    finally:
        os.chdir(cwd)
    (root / "fake_stages.json").write_text(json.dumps({"log": str(log), "stages": described}, indent=1))
    return list(described)


def clone(src: Path, dst: Path, cache: Path | None = None) -> Path:
    """A fresh clone of ``src``; ``cache``: share that DVC cache (`dvc cache dir`)."""
    sh(src.parent, "git", "clone", "-q", str(src), str(dst))
    sh(dst, "dvc", "config", "--local", "core.analytics", "false")
    if cache is not None:
        sh(dst, "dvc", "cache", "dir", "--local", str(cache))
    return dst


def metrics_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted((root / "metrics").rglob("*.json"))}


def wait_for_queue(root: Path, timeout_s: float = 300) -> str:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = sh(root, "dvc", "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(1)
    raise AssertionError(f"the queue did not finish in {timeout_s:.0f} s:\n{status}")


# -- a committed dvc.lock over fake outputs (no commands run at all) -------------------------------------------


@contextlib.contextmanager
def repo_at(root: Path):
    """Open the scratch repository from inside it (DVC resolves stage paths against the cwd)."""
    from dvc.repo import Repo

    cwd = os.getcwd()
    os.chdir(root)
    try:
        with Repo(root) as repo:
            yield repo
    finally:
        os.chdir(cwd)


def fake(path: Path, content: str) -> None:
    """A stand-in output: a small file, or a folder holding one (distinct contents per stage)."""
    if path.suffix in (".json", ".md", ".csv", ".png", ".yaml", ".tsv"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n")
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "fake").write_text(content + "\n")


def status_of(root: Path, **changes) -> set[str]:
    """Stage names `dvc status` reports after applying dotted-key changes to params.yaml (then restored)."""
    params = root / "params.yaml"
    original = params.read_text()
    raw = yaml.safe_load(original)
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        with repo_at(root) as repo:
            return set(repo.status())
    finally:
        params.write_text(original)


def faked_lock(root: Path) -> Path:
    """dvc.yaml and params.yaml in a DVC repository at ``root``, every output faked with a tiny file and
    recorded by ``dvc commit``, as if `dvc repro` had run: ``dvc status`` then says what a change invalidates."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    Repo.init(root, no_scm=True)
    with repo_at(root) as repo:
        stages = list(repo.index.stages)
    outs = {str(Path(o.def_path)) for s in stages for o in s.outs}
    for stage in stages:
        for out in stage.outs:
            fake(root / out.def_path, stage.addressing)
    for stage in stages:
        for dep in stage.deps:
            if isinstance(dep, ParamsDependency):
                continue
            path = Path(dep.def_path)
            if (root / path).exists():
                continue
            if any(str(path).startswith(o + "/") for o in outs):  # a part of another stage's output
                fake(root / path, stage.addressing)
                continue
            src = REPO / path
            assert src.exists(), f"{stage.addressing} depends on {path}, which is neither in the repository nor an output"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, root / path) if src.is_dir() else shutil.copy(src, root / path)
    with repo_at(root) as repo:
        repo.commit(None, force=True)
    (root / "stages.txt").write_text("\n".join(s.addressing for s in stages) + "\n")
    return root
