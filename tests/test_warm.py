"""Warm start (hrkd/warm.py): a served stage is the script run as a fresh process would run it.

A throwaway stage script, run as DVC runs a stage (``python <script>``), reports what it sees; a
served run must see the same argv, working directory, environment, umask, stdin and fresh modules
as a plain one, pass its exit status, errors and signals through, and die with its client. The
last test runs a real stage (a demo teacher) both ways and compares the bytes it writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from hrkd import warm

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="warm start is Linux-only")

REPO = Path(__file__).resolve().parents[1]

SCRIPT = '''
import sys
early = sorted(m for m in sys.modules if m.split(".")[0] in ("hrkd", "helper"))
import json, os, time
from pathlib import Path
import typer
from hrkd.cli import stage
from hrkd.errors import HRKDError
import helper

app = typer.Typer(add_completion=False)


@app.command()
@stage
def main(mode: str = "ok", pidfile: str = "", extra: str = ""):
    umask = os.umask(0)
    os.umask(umask)
    print(json.dumps({"early": early, "served": os.environ.get("HRKD_WARM_CHILD"), "argv": sys.argv,
                      "cwd": os.getcwd(), "mark": os.environ.get("MARK"), "umask": umask, "path": sys.path,
                      "helper": helper.VALUE, "stdin": sys.stdin.read(), "name": __name__}))
    sys.stdout.flush()
    if mode == "exit3":
        raise SystemExit(3)
    if mode == "boom":
        raise RuntimeError("boom")
    if mode == "hrkd":
        raise HRKDError("bad input: fix it")
    if mode == "sleep":
        Path(pidfile).write_text(str(os.getpid()))
        time.sleep(120)


if __name__ == "__main__":
    app()
'''


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory):
    """The script, its helper module, and an environment whose server only this module uses."""
    root = tmp_path_factory.mktemp("warm")
    (root / "stage.py").write_text(SCRIPT)
    (root / "helper.py").write_text("VALUE = 1\n")
    (root / "work").mkdir()
    env = {**os.environ, "HRKD_WARM": "1", "HRKD_WARM_IDLE": "60", "HRKD_WARM_TEST": uuid.uuid4().hex,
           "HF_HUB_OFFLINE": "1", "MARK": "x"}
    env.pop(warm.ENV_CHILD, None)
    yield {"root": root, "env": env}
    subprocess.run(["pkill", "-f", env["HRKD_WARM_TEST"]], check=False)


def run(stage_dir, *args, warm_on=True, stdin="", **env):
    environ = {**stage_dir["env"], **env, "HRKD_WARM": "1" if warm_on else "0"}
    return subprocess.run([sys.executable, str(stage_dir["root"] / "stage.py"), *args], input=stdin,
                          cwd=stage_dir["root"] / "work", env=environ, capture_output=True, text=True, timeout=120)


def report(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[0])


def server_info(env: dict[str, str]) -> dict | None:
    """``python -m hrkd.warm status`` in ``env``: the server a stage script in ``env`` would use."""
    proc = subprocess.run([sys.executable, "-m", "hrkd.warm", "status"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if proc.stdout.startswith("{") else None


def wait_for_server(env: dict[str, str]) -> dict:
    deadline = time.monotonic() + 90
    while (info := server_info(env)) is None:
        assert time.monotonic() < deadline, "no warm server answered within 90 s"
        time.sleep(0.5)
    return info


def served(stage_dir, *args, stdin="", **env):
    """Run the script once a warm server is up (the first run of an environment starts it)."""
    environ = {**stage_dir["env"], **env}
    if server_info(environ) is None:
        run(stage_dir, **env)  # runs in its own process and starts the server
        wait_for_server(environ)
    proc = run(stage_dir, *args, stdin=stdin, **env)
    assert report(proc)["served"] == "1", proc.stderr
    return proc


def test_a_served_stage_sees_what_a_fresh_process_sees(stage_dir):
    args = ("--extra", "a b", "--mode", "ok")
    warm_run = served(stage_dir, *args, stdin="rows on stdin\n", DVC_STAGE="one")
    plain = run(stage_dir, *args, warm_on=False, stdin="rows on stdin\n", DVC_STAGE="two")
    assert warm_run.returncode == plain.returncode == 0, warm_run.stderr
    got, want = report(warm_run), report(plain)
    assert got.pop("served") == "1" and want.pop("served") is None
    assert got == want
    # The server never imported this package: the child read hrkd from disk, like a fresh process.
    assert got["early"] == [] and got["name"] == "__main__" and got["cwd"] == str(stage_dir["root"] / "work")


def test_umask_and_an_edited_module_reach_the_child(stage_dir):
    served(stage_dir)
    helper = stage_dir["root"] / "helper.py"
    helper.write_text("VALUE = 2\n")
    os.utime(helper, ns=(time.time_ns(), time.time_ns() + 10**9))
    old = os.umask(0o027)
    try:
        got = report(served(stage_dir))
    finally:
        os.umask(old)
    assert got["helper"] == 2 and got["umask"] == 0o027


@pytest.mark.parametrize("mode, code, last_line", [
    ("exit3", 3, None),
    ("boom", 1, "RuntimeError: boom"),
    ("hrkd", 2, "error: bad input: fix it"),
])
def test_exit_status_and_errors_pass_through(stage_dir, mode, code, last_line):
    proc = served(stage_dir, "--mode", mode)
    plain = run(stage_dir, "--mode", mode, warm_on=False)
    assert proc.returncode == plain.returncode == code
    if last_line is not None:
        assert proc.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1] == last_line


def _start_sleeper(stage_dir, tmp_path):
    served(stage_dir)  # a server is up: the sleeper below is served
    pidfile = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, str(stage_dir["root"] / "stage.py"), "--mode", "sleep",
                             "--pidfile", str(pidfile)], cwd=stage_dir["root"] / "work", env=stage_dir["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not pidfile.is_file() or not pidfile.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "the sleeper never started"
        time.sleep(0.1)
    child = int(pidfile.read_text())
    assert child != proc.pid  # it runs in a warm child, not in the process DVC started
    return proc, child


def _gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_reaches_the_child_and_exits_as_the_stage_would(stage_dir, tmp_path):
    proc, child = _start_sleeper(stage_dir, tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("interrupted: outputs were not replaced")
    assert _gone(child)


def test_a_killed_stage_takes_its_child_with_it(stage_dir, tmp_path):
    proc, child = _start_sleeper(stage_dir, tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    assert _gone(child)


def test_the_key_ignores_only_what_changes_from_stage_to_stage():
    base = {"PATH": "/bin", "HF_HUB_OFFLINE": "1"}
    assert warm.server_key({**base, "DVC_STAGE": "a", "PWD": "/x"}) == warm.server_key({**base, "DVC_STAGE": "b"})
    assert warm.server_key(base) != warm.server_key({**base, "HF_HUB_OFFLINE": "0"})
    assert warm.server_key(base) != warm.server_key({**base, "OMP_NUM_THREADS": "1"})


def test_switched_off_for_torchrun_workers_children_and_on_request():
    assert warm.enabled({}) == sys.platform.startswith("linux")
    for env in ({"HRKD_WARM": "0"}, {"LOCAL_RANK": "0"}, {"WORLD_SIZE": "2"}, {warm.ENV_CHILD: "1"}):
        assert not warm.enabled(env)


@pytest.mark.slow
def test_a_served_teacher_stage_writes_the_same_bytes(stage_dir, tmp_path):
    """prepare -> pretrained -> one demo teacher, the teacher run plain and served: identical files."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tasks"], params["fewshot"]["tasks"] = ["amazon"], []
    params["demo"]["amazon"] = {"train": 64, "dev": 16, "test": 16}
    params["profiles"]["demo"]["teacher"].update(epochs=1, eval_every=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**stage_dir["env"], "HRKD_LOG_LEVEL": "WARNING"}

    def script(name, *args, warm_on=True):
        proc = subprocess.run([sys.executable, str(REPO / "pipeline" / name), *args], cwd=tmp_path,
                              env={**env, "HRKD_WARM": "1" if warm_on else "0"}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    script("prepare_data.py", "--task", "amazon", warm_on=False)
    script("pretrained.py", warm_on=False)
    outs = {}
    for label, warm_on in (("plain", False), ("served", True)):
        if warm_on:  # a server for this environment first (the runs above had warm start off)
            served(stage_dir, HRKD_LOG_LEVEL="WARNING")
            before = server_info(env)
        script("train_teacher.py", "--task", "amazon", "--kind", "mix", "--out", f"out-{label}",
               "--metrics", f"m-{label}.json", "--live", f"live-{label}", "--resume", f"resume-{label}",
               warm_on=warm_on)
        outs[label] = {p.relative_to(tmp_path / f"out-{label}").as_posix(): p.read_bytes()
                       for p in sorted((tmp_path / f"out-{label}").rglob("*")) if p.is_file()}
    assert server_info(env)["served"] == before["served"] + 1  # the second run was served
    assert outs["plain"] and outs["plain"] == outs["served"]
    assert (tmp_path / "m-plain.json").read_text() == (tmp_path / "m-served.json").read_text()
