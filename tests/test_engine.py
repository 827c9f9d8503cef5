"""Engine tests: schedules, LR schedule, determinism, resume, NaN guard, DDP parity (toy model)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from hrkd.config import Engine, TrainSettings
from hrkd.data.loading import EncodedSplit, Schedule, TaskSplits, collate, shard
from hrkd.engine import (Job, NonFiniteLoss, Place, Runtime, Trainer, launch_command, linear_warmup_decay, seed_everything,
                         warmup_constant)
from hrkd.teachers import per_domain_summed_ce
from helpers import stop_at

ENGINE = Engine(progress=False, log_every=2)


def toy_task(sizes=(12, 7, 9), vocab=20, length=6, seed=0) -> TaskSplits:
    g = torch.Generator().manual_seed(seed)
    splits = {}
    domains = [f"d{i}" for i in range(len(sizes))]
    for d, n in zip(domains, sizes):
        splits[d] = {}
        for split, m in (("train", n), ("dev", 5), ("test", 5)):
            ids = torch.randint(1, vocab, (m, length), generator=g, dtype=torch.int32)
            labels = (ids[:, 0] % 2).long()  # learnable: label is the parity of the first token
            splits[d][split] = EncodedSplit(ids, torch.zeros_like(ids, dtype=torch.int8),
                                            torch.full((m,), length, dtype=torch.int32), labels)
    return TaskSplits(name="toy", labels=["a", "b"], domains=domains, splits=splits)


class Toy(nn.Module):
    def __init__(self, vocab=20, dim=8, domains=3, nan_at: int | None = None):
        super().__init__()
        self.emb = nn.EmbeddingBag(vocab, dim)
        self.drop = nn.Dropout(0.2)  # makes RNG state part of what resume must restore
        self.heads = nn.ModuleList(nn.Linear(dim, 2) for _ in range(domains))
        self.calls = 0
        self.nan_at = nan_at
        self.num_domains = domains

    def logits(self, batch):
        h = self.drop(self.emb(batch.input_ids))
        all_heads = torch.stack([head(h) for head in self.heads], 1)  # [B, D, C]
        return all_heads[torch.arange(len(h)), batch.domain_ids]

    def forward(self, batch):
        self.calls += 1
        loss = per_domain_summed_ce(self.logits(batch), batch.labels, batch.domain_ids, self.num_domains)
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"calls": torch.tensor(float(self.calls))}


def make_trainer(task, tmp_path, module=None, settings=None, live_dir=None, stop_at_step=None) -> Trainer:
    seed_everything(0)
    module = module or Toy()
    settings = settings or TrainSettings(epochs=3, batch_size=4, lr=0.05, eval_every=5, eval_batch_size=8)

    def evaluate(m):
        out = {}
        for i, d in enumerate(task.domains):
            b = collate(task, "dev", [(i, torch.arange(5))])
            out[d] = float((m.logits(b).argmax(-1) == b.labels).float().mean())
        return out

    job = Job(module=module, make_batch=lambda step: collate(task, "train", step),
              schedule=Schedule("parallel", tuple(task.sizes("train")), settings.batch_size, seed=3),
              settings=settings, evaluate=evaluate, domains=task.domains, config={"toy": 1})
    place = Place(Runtime(device=torch.device("cpu")), ENGINE, tmp_path / "resume", live_dir)
    return Trainer(job, place, [stop_at(stop_at_step)] if stop_at_step is not None else ())


# -- schedules --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mix", "mtl"])
def test_pooled_schedules_visit_every_row_once_per_epoch(kind):
    sched = Schedule(kind, (10, 3, 7), batch_size=4, seed=1)
    steps = sched.epoch(0)
    assert len(steps) == sched.steps_per_epoch == {"mix": 5, "mtl": 3 + 1 + 2}[kind]
    seen = sorted((d, int(i)) for step in steps for d, idx in step for i in idx)
    assert seen == sorted((d, i) for d, n in enumerate((10, 3, 7)) for i in range(n))
    if kind == "mtl":
        assert all(len(step) == 1 for step in steps)  # one domain per batch


def test_single_schedule_and_determinism():
    sched = Schedule("single", (10, 3), batch_size=4, seed=1, domain=1)
    assert sched.steps_per_epoch == 1
    assert sorted(sched.epoch(0)[0][0][1].tolist()) == [0, 1, 2]
    a = Schedule("mix", (10, 3, 7), 4, seed=5)
    assert all(torch.equal(x[0][1], y[0][1]) for x, y in zip(a.epoch(2), a.epoch(2)))
    assert any(not torch.equal(x[0][1], y[0][1]) for x, y in zip(a.epoch(0), a.epoch(1)))


def test_parallel_schedule_takes_one_batch_of_every_domain_per_step():
    sched = Schedule("parallel", (10, 3, 7), batch_size=4, seed=1)
    steps = sched.epoch(0)
    assert len(steps) == 3  # ceil(10 / 4): the largest domain is covered once
    for step in steps:
        assert [d for d, _ in step] == [0, 1, 2]
        assert [len(idx) for _, idx in step] == [4, 3, 4]  # domain 1 has fewer rows than a batch
    largest = sorted(int(i) for step in steps for i in step[0][1])
    assert set(largest) == set(range(10)) and len(largest) == 12  # wraps into a fresh permutation


def test_shard_splits_groups_contiguously():
    step = [(0, torch.arange(8)), (2, torch.arange(6))]
    parts = [shard(step, r, 2) for r in range(2)]
    assert [idx.tolist() for _, idx in parts[0]] == [[0, 1, 2, 3], [0, 1, 2]]
    assert [idx.tolist() for _, idx in parts[1]] == [[4, 5, 6, 7], [3, 4, 5]]


def test_linear_warmup_decay_by_hand():
    # total 10, warmup 2: 0, 0.5, 1 then (10-s)/8
    assert [linear_warmup_decay(s, 10, 2) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert [warmup_constant(s, 10, 2) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 1.0, 1.0]


def test_trainer_follows_the_configured_lr_schedule(tmp_path):
    task = toy_task()
    settings = TrainSettings(epochs=1, batch_size=4, lr=0.1, warmup_ratio=0.0, lr_schedule="constant", eval_every=50)
    trainer = make_trainer(task, tmp_path, settings=settings)
    trainer.fit()
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.1)  # linear would have decayed to 0


def test_per_domain_summed_ce_by_hand():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 0])
    dom = torch.tensor([0, 0, 2])
    ln2 = torch.log(torch.tensor(2.0))
    expected = ln2 + torch.log1p(torch.exp(torch.tensor(-2.0)))  # mean of domain 0 + domain 2; domain 1 absent
    assert torch.allclose(per_domain_summed_ce(logits, labels, dom, 3), expected)


# -- trainer ------------------------------------------------------------------------------------


def _final_params(trainer):
    return {k: v.clone() for k, v in trainer.module.state_dict().items()}


def test_training_learns_and_is_deterministic(tmp_path):
    task = toy_task()
    r1 = make_trainer(task, tmp_path / "a").fit()
    t2 = make_trainer(task, tmp_path / "b")
    r2 = t2.fit()
    assert r1.history == r2.history
    assert r1.steps == 3 * 3
    assert set(r1.best) == set(task.domains)
    assert all((tmp_path / "b" / "resume" / "best" / f"step-{s.step}.pt").is_file() for s in r2.best.values())


def _train_loss(module, task) -> float:
    """The toy's loss on every training row, dropout off."""
    module.eval()
    with torch.no_grad():
        steps = [(i, torch.arange(n)) for i, n in enumerate(task.sizes("train"))]
        loss, _ = module(collate(task, "train", steps))
    module.train()
    return float(loss)


def test_training_lowers_the_loss_on_a_learnable_toy(tmp_path):
    """The optimiser really steps: with it replaced by a no-op this fails (determinism alone would not)."""
    task = toy_task()
    trainer = make_trainer(task, tmp_path, settings=TrainSettings(epochs=15, batch_size=4, lr=0.05, eval_every=1000))
    before = _train_loss(trainer.module, task)
    trainer.fit()
    after = _train_loss(trainer.module, task)
    assert after < 0.7 * before, (before, after)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    task = toy_task()
    full = make_trainer(task, tmp_path / "full")
    full_result = full.fit()
    expected = _final_params(full)

    crashed = make_trainer(task, tmp_path / "run", stop_at_step=7)  # state saved at step 5
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    resumed = make_trainer(task, tmp_path / "run")
    result = resumed.fit()
    assert result.history == full_result.history
    for k, v in _final_params(resumed).items():
        assert torch.equal(v, expected[k]), k
    resumed.finish()
    assert not (tmp_path / "run" / "resume" / "state.pt").exists()


def _live_rows(live: Path) -> dict[str, str]:
    # train/calls counts the toy's forward calls in this process, which a resume cannot know.
    return {str(p.relative_to(live)): p.read_text() for p in sorted((live / "plots").rglob("*.tsv"))
            if p.name != "calls.tsv"}


def test_resume_rebuilds_the_live_log_that_dvc_deleted(tmp_path):
    """DVC deletes a stage's outputs (the DVCLive folder among them) before rerunning it; the resumed
    run must end with exactly the curves of an uninterrupted one: no rows lost, none logged twice."""
    task = toy_task()
    full = make_trainer(task, tmp_path / "full", live_dir=tmp_path / "full" / "live")
    full.fit()
    crashed = make_trainer(task, tmp_path / "run", live_dir=tmp_path / "run" / "live", stop_at_step=7)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()  # state saved at step 5, rows of steps 6-7 already logged
    shutil.rmtree(tmp_path / "run" / "live")
    make_trainer(task, tmp_path / "run", live_dir=tmp_path / "run" / "live").fit()
    expected = _live_rows(tmp_path / "full" / "live")
    assert expected and _live_rows(tmp_path / "run" / "live") == expected


def test_resume_state_of_another_configuration_is_ignored(tmp_path):
    task = toy_task()
    crashed = make_trainer(task, tmp_path, stop_at_step=5)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    other = make_trainer(task, tmp_path, settings=TrainSettings(epochs=2, batch_size=4, lr=0.01, eval_every=5))
    assert other.fit().steps == 6  # started from scratch, not from step 5


def test_nan_loss_stops_with_the_step(tmp_path):
    task = toy_task()
    trainer = make_trainer(task, tmp_path, module=Toy(nan_at=3))
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        trainer.fit()


# -- DDP ----------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, os.environ["TESTS_DIR"])
    from test_engine import toy_task, Toy, ENGINE
    from hrkd.config import TrainSettings
    from hrkd.data.loading import Schedule, collate, shard
    from hrkd.engine import Job, Place, Trainer, setup_runtime, seed_everything
    rt = setup_runtime(ENGINE)
    task = toy_task()
    seed_everything(0)
    module = Toy()
    module.drop.p = 0.0  # dropout masks differ with the batch shape; compare the maths only
    settings = TrainSettings(epochs=2, batch_size=4, lr=0.05, eval_every=100, max_grad_norm=None)
    job = Job(module=module, make_batch=lambda s: collate(task, "train", shard(s, rt.rank, rt.world)),
              schedule=Schedule("parallel", tuple(task.sizes("train")), 4, seed=3), settings=settings,
              evaluate=lambda m: {}, domains=task.domains, config={})
    trainer = Trainer(job, Place(rt, ENGINE, os.environ["OUT"] + "/resume"))
    trainer.fit()
    if rt.rank == 0:
        torch.save(module.state_dict(), os.environ["OUT"] + "/params.pt")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    """One process, two processes on one node, and two single-process "nodes" that meet through
    torchrun's static rendezvous (engine.nnodes/node_rank/master_*, as on two machines) train the
    same model: the commands are the ones maybe_relaunch runs."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    layouts = {"1 process": [Engine(nproc=1)], "1 node x 2": [Engine(nproc=2)]}
    port = _free_port()
    layouts["2 nodes x 1"] = [Engine(nproc=1, nnodes=2, node_rank=r, master_port=port) for r in (0, 1)]
    results = {}
    for name, engines in layouts.items():
        out = tmp_path / name.replace(" ", "_")
        out.mkdir()
        env = {**os.environ, "TESTS_DIR": str(Path(__file__).parent), "OUT": str(out), "OMP_NUM_THREADS": "1"}
        cmds = [launch_command(e, [str(script)]) or [sys.executable, str(script)] for e in engines]
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in cmds]
        for proc in procs:
            output, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, output[-3000:]
        results[name] = torch.load(out / "params.pt")
    assert launch_command(Engine(), ["x.py"]) is None
    for name in ("1 node x 2", "2 nodes x 1"):
        for k in results["1 process"]:
            assert torch.allclose(results["1 process"][k], results[name][k], atol=1e-5), (name, k)


def test_runs_and_benchmarks_share_one_fused_adamw():
    """The benchmarks time the optimiser the runs use; fused on CPU too, no decay on biases/LayerNorm."""
    from hrkd.engine import make_optimizer

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    opt = make_optimizer(module, 0.01, 1e-3)
    assert opt.defaults["fused"] is True
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]


# -- where a stage runs ---------------------------------------------------------------------


@pytest.mark.parametrize("given, visible", [(3, "3"), ([0, 1], "0,1"), ("0,1", "0,1")])
def test_engine_gpus_pins_the_stage_before_cuda_starts(given, visible, monkeypatch):
    from hrkd.engine import maybe_relaunch

    monkeypatch.setenv("LOCAL_RANK", "0")  # as inside torchrun: pin only, never relaunch
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    maybe_relaunch(Engine(gpus=given))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == visible


@pytest.mark.parametrize("bad", [{"gpus": True}, {"gpus": "a"}, {"gpus": -1}, {"nnodes": 2, "node_rank": 2}])
def test_engine_rejects_impossible_placements(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Engine(**bad)


def test_multi_node_command_uses_static_rendezvous():
    cmd = launch_command(Engine(nproc=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29600), ["s.py"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[-1] == "s.py"
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29600",
            "--nproc_per_node=4"} <= set(cmd) and "--standalone" not in cmd
    assert "--standalone" in launch_command(Engine(nproc=2), ["s.py"])


def test_seconds_since_process_start_brackets_a_child_process():
    # The child sleeps before asking; its answer must cover that sleep and fit in the parent's
    # wall time of the whole child (a wrong /proc field gives ticks, thread counts or garbage).
    if sys.platform != "linux":
        pytest.skip("/proc is Linux's")
    code = ("import time; t = time.monotonic(); time.sleep(1.0); "
            "from hrkd.engine import seconds_since_process_start as f; print(f(), time.monotonic() - t)")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    wall = time.monotonic() - start
    since_start, inside = float(out[0]), float(out[1])
    assert inside - 0.02 <= since_start <= wall + 0.02
