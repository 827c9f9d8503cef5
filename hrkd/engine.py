"""The training engine shared by teachers and students.

One loop for every method: AdamW with linear warmup/decay, gradient clipping, mixed precision
on GPU, DDP under torchrun, dev evaluation every N steps with the best checkpoint kept per
domain (as the authors select), DVCLive logging, a NaN guard, and exact resume after a kill.

Methods plug in through a :class:`Job`: a module whose ``forward(batch)`` returns
``(loss, logs)``, a ``make_batch(step)`` that turns a schedule step into that batch on the right
device, and a dev evaluation. What a stage does around it (staging, selection, saving) is
:mod:`hrkd.driver`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hrkd.config import Engine, TrainSettings
from hrkd.data.loading import Schedule, Step
from hrkd.errors import HRKDError
from hrkd.io import atomic_file, write_json

log = logging.getLogger("hrkd.engine")

SHARED = "_shared"


# ---------------------------------------------------------------------------------------------
# Runtime: device, precision, process group
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    amp_dtype: torch.dtype | None = None
    use_scaler: bool = False
    # The frozen teachers' forwards (distillation): their own autocast dtype, None = fp32.
    teacher_amp_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def teacher_autocast(self):
        """The autocast a frozen teacher's forward runs under, whatever the step's is."""
        if self.teacher_amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.teacher_amp_dtype)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_runtime(engine: Engine) -> Runtime:
    """Pick device and precision; join the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = engine.device == "cuda" or (engine.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise HRKDError("engine.device is 'cuda' but no CUDA GPU is visible: set engine.device=auto or cpu")
    if want_cuda:
        if local_rank >= torch.cuda.device_count():
            raise HRKDError(
                f"engine.nproc asks for {world} processes but only {torch.cuda.device_count()} GPU(s) are visible; "
                "lower engine.nproc"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    precision = engine.precision
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    teacher_precision = engine.teacher_precision
    if teacher_precision == "auto":
        # The teachers are frozen: no gradients or optimiser state to lose to rounding, and their
        # forward is most of a distillation step's FLOPs (docs/speed.md has the loss tolerance).
        teacher_precision = precision if device.type == "cuda" else ("bf16" if cpu_has_bf16() else "fp32")
    for key, value in (("precision", precision), ("teacher_precision", teacher_precision)):
        if value == "fp16" and device.type != "cuda":
            raise HRKDError(f"engine.{key}=fp16 needs a CUDA GPU; use auto, fp32 or bf16 on CPU")
    if device.type == "cuda":
        # TF32 matmuls: a large speed-up on Ampere+ at accuracy irrelevant for fine-tuning.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    return Runtime(device=device, rank=rank, world=world, amp_dtype=dtype[precision], use_scaler=precision == "fp16",
                   teacher_amp_dtype=dtype[teacher_precision])


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_units(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, ...]:
    """The native bf16 units this CPU's flags list (of ``BF16_CPU_FLAGS``); () off Linux."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 products natively (AVX512-BF16 or AMX-BF16).

    oneDNN runs bf16 matmuls on any AVX-512 CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported``
    says yes there), but without these units it emulates them, slower than fp32; the flags are
    what tells the two apart. Off Linux the answer is no: fp32, as before.
    """
    return bool(cpu_bf16_units(cpuinfo))


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process was created (Linux ``/proc``), or None elsewhere."""
    try:
        # Field 22 of /proc/self/stat, counted after the ")" that ends the command name.
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def keep_freed_memory() -> bool:
    """Stop glibc from handing big freed blocks back to the OS (CPU runs only).

    glibc serves blocks above its mmap threshold with a fresh mapping and unmaps them on free, so
    every training step page-faults its gradients (47 MB for BERT's word embeddings) and larger
    activations back in: 8-11 % of a small-profile distillation step on this project's 2-core
    machine (A/B of one step, 2026-12-02). Keeping them in the heap is
    what the jemalloc/tcmalloc preload of PyTorch's CPU tuning guide achieves. A no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        # mallopt(M_MMAP_MAX, 0): no mmap'd blocks; M_TRIM_THRESHOLD: never trim the heap's top.
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(obj: Any) -> str:
    """Stable hash of a run's configuration: a resume state is reused only for the same run."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def launch_command(engine: Engine, argv: list[str]) -> list[str] | None:
    """The torchrun command that runs ``argv`` as ``engine`` asks, or None for one plain process."""
    if engine.nproc <= 1 and engine.nnodes <= 1:
        return None
    if engine.nnodes > 1:  # static rendezvous: the same command on every machine, its own node_rank
        where = [f"--nnodes={engine.nnodes}", f"--node_rank={engine.node_rank}",
                 f"--master_addr={engine.master_addr}", f"--master_port={engine.master_port}"]
    else:
        where = ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={engine.nproc}", *argv]


def maybe_relaunch(engine: Engine, argv: list[str] | None = None) -> None:
    """Pin the stage to ``engine.gpus`` and re-run it under torchrun when DDP is asked for.

    Inside torchrun (``LOCAL_RANK`` set) this only pins the GPUs, which the children inherit anyway.
    """
    if engine.gpus is not None:  # before anything initialises CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = engine.gpus
    if "LOCAL_RANK" in os.environ:
        return
    cmd = launch_command(engine, list(sys.argv if argv is None else argv))
    if cmd is None:
        return
    import subprocess

    log.info("relaunching under torchrun: %d node(s) x %d process(es)", engine.nnodes, engine.nproc)
    raise SystemExit(subprocess.call(cmd))


# ---------------------------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------------------------


def make_optimizer(module: nn.Module, weight_decay: float, lr: float) -> torch.optim.AdamW:
    """The AdamW every run (and every benchmark) uses.

    Fused on CPU as on GPU: one kernel over all tensors instead of a Python-level loop. On a real
    checkpoint the 30k-row embedding matrix makes the optimiser step dominate small batches
    (all-MiniLM-L6-v2: 0.13 s foreach vs 0.02 s fused on this project's 2-core CPU).
    """
    return torch.optim.AdamW(param_groups(module, weight_decay, lr), lr=lr, fused=True)


def param_groups(module: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict[str, Any]]:
    """BERT convention: no weight decay on biases and LayerNorm weights.

    A module may set ``lr_scales`` {name prefix: factor}: those parameters get their own groups
    at ``lr * factor`` (the schedule multiplies every group's rate alike). Without it, or
    without ``lr``, the two groups are exactly as before.
    """
    scales = dict(getattr(module, "lr_scales", None) or {}) if lr is not None else {}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((f for prefix, f in scales.items() if name.startswith(prefix)), 1.0)
        nodecay = p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias")
        groups.setdefault((scale, nodecay), []).append(p)
    out = [{"params": groups.get((1.0, False), []), "weight_decay": weight_decay},
           {"params": groups.get((1.0, True), []), "weight_decay": 0.0}]
    for (scale, nodecay), params in groups.items():
        if scale != 1.0:
            out.append({"params": params, "weight_decay": 0.0 if nodecay else weight_decay, "lr": lr * scale})
    return out


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def warmup_constant(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then constant."""
    return step / max(1, warmup) if step < warmup else 1.0


LR_SCHEDULES = {"linear": linear_warmup_decay, "constant": warmup_constant}


def discard_resume(root: str | Path, runtime: Runtime) -> None:
    """Delete a stage's resume folder once all its outputs are written.

    Resume state is scratch, not a DVC output (an output marked ``persist`` would keep the stage out
    of DVC's run-cache): a killed stage resumes from it, a successful one leaves nothing behind.
    """
    if runtime.is_main:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """The checkpoint chosen for one domain: the step with the best dev accuracy."""

    step: int
    dev: float


@dataclass
class TrainResult:
    best: dict[str, Selection]
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


class NonFiniteLoss(HRKDError):
    pass


@dataclass
class Job:
    """What one optimisation trains: the method's side of a :class:`Trainer`.

    ``module.forward(batch) -> (loss, logs)`` where logs maps names to scalar tensors;
    ``make_batch(step)`` turns a schedule step into that batch on the right device;
    ``evaluate(module) -> {domain: dev accuracy}`` runs on the main process only;
    ``snapshot(module) -> state_dict`` is what "the best checkpoint of domain d" keeps (e.g. only
    the student of a distillation wrapper; default the whole module). ``config`` is the run's
    record: its fingerprint decides whether a resume state belongs to this run.
    ``select_average`` also keeps the step with the best average dev accuracy (key ``_shared``).
    """

    module: nn.Module
    make_batch: Callable[[Step], Any]
    schedule: Schedule
    settings: TrainSettings
    evaluate: Callable[[nn.Module], dict[str, float]]
    domains: list[str]
    config: dict[str, Any]
    snapshot: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    find_unused_parameters: bool = False
    select_average: bool = False
    desc: str = "train"


@dataclass(frozen=True)
class Place:
    """Where a :class:`Trainer` runs and keeps its state."""

    runtime: Runtime
    engine: Engine
    resume_dir: Path
    live_dir: Path | None = None


# Called after every optimiser step (after that step's evaluation and state save): progress
# hooks, or a test's simulated crash.
Callback = Callable[["Trainer"], None]


class Trainer:
    """Runs one optimisation: ``job.settings.epochs`` passes of ``job.schedule`` over ``job.module``."""

    def __init__(self, job: Job, place: Place, callbacks: Sequence[Callback] = ()) -> None:
        runtime, settings = place.runtime, job.settings
        self.job = job
        self.module = job.module.to(runtime.device)
        self.make_batch = job.make_batch
        self.schedule = job.schedule
        self.settings = settings
        self.runtime = runtime
        self.engine = place.engine
        self.evaluate = job.evaluate
        self.domains = list(job.domains)
        # "_shared": one checkpoint for every domain, the step with the best average dev accuracy.
        self.selection_keys = self.domains + ([SHARED] if job.select_average else [])
        self.resume_dir = Path(place.resume_dir)
        self.fingerprint = fingerprint(job.config)
        self.live_dir = Path(place.live_dir) if place.live_dir is not None else None
        self.snapshot = job.snapshot or (lambda m: m.state_dict())
        self.desc = job.desc
        self.callbacks = tuple(callbacks)
        self.total_steps = settings.epochs * self.schedule.steps_per_epoch
        self.wrapped: nn.Module = self.module
        if runtime.world > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                find_unused_parameters=job.find_unused_parameters,
            )
        self.optimizer = make_optimizer(self.module, settings.weight_decay, settings.lr)
        warmup = int(settings.warmup_ratio * self.total_steps)
        shape = LR_SCHEDULES[settings.lr_schedule]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: shape(s, self.total_steps, warmup))
        self.scaler = torch.amp.GradScaler("cuda") if runtime.use_scaler else None
        self.best: dict[str, Selection] = {}
        self.history: list[dict[str, Any]] = []
        self.step = 0

    # -- persistence ---------------------------------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.resume_dir / "state.pt"

    def _best_path(self, step: int) -> Path:
        return self.resume_dir / "best" / f"step-{step}.pt"

    def _save_state(self) -> None:
        if not self.runtime.is_main:
            return
        state = {
            "fingerprint": self.fingerprint,
            "step": self.step,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": _rng_state(),
            "best": {d: (s.step, s.dev) for d, s in self.best.items()},
            "history": self.history,
        }
        with atomic_file(self._state_path, "wb") as handle:
            torch.save(state, handle)
        self._snapshot_live()
        write_json(self.resume_dir / "status.json", {"complete": False, "fingerprint": self.fingerprint, "step": self.step})

    @property
    def _live_snapshot(self) -> Path:
        return self.resume_dir / "live"

    def _snapshot_live(self) -> None:
        """Keep the DVCLive folder as of this state: DVC deletes a stage's outputs before rerunning it,
        and rows logged after the state would be logged twice on resume."""
        if self.live_dir is None or not self.live_dir.is_dir():
            return
        tmp = self._live_snapshot.with_name("live.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.live_dir, tmp)
        shutil.rmtree(self._live_snapshot, ignore_errors=True)
        os.replace(tmp, self._live_snapshot)

    def _restore_live(self) -> None:
        if self.live_dir is None or not self._live_snapshot.is_dir():
            return
        shutil.rmtree(self.live_dir, ignore_errors=True)
        shutil.copytree(self._live_snapshot, self.live_dir)

    def _try_resume(self) -> bool:
        if not self._state_path.is_file():
            return False
        try:
            state = torch.load(self._state_path, map_location="cpu", weights_only=False)
        except Exception as err:  # a torn file from a kill mid-write: start over rather than crash
            log.warning("ignoring unreadable resume state %s (%s)", self._state_path, err)
            return False
        if state.get("fingerprint") != self.fingerprint:
            log.warning("resume state in %s belongs to a different configuration; starting fresh", self.resume_dir)
            return False
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.best = {d: Selection(step=s, dev=a) for d, (s, a) in state["best"].items()}
        self.history = list(state["history"])
        log.info("resumed %s from step %d/%d (%s)", self.desc, self.step, self.total_steps, self.resume_dir)
        return True

    def _reset_resume_dir(self) -> None:
        if self.runtime.is_main and self.resume_dir.exists():
            for child in self.resume_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()

    def best_state(self, domain: str) -> dict[str, torch.Tensor]:
        """The snapshot selected for ``domain`` (loaded from the resume directory)."""
        sel = self.best[domain]
        return torch.load(self._best_path(sel.step), map_location="cpu", weights_only=True)

    def finish(self) -> None:
        """Drop the resume data of a completed run; a rerun then starts from scratch."""
        self.runtime.barrier()
        if self.runtime.is_main:
            self._reset_resume_dir()
            self.resume_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.resume_dir / "status.json", {"complete": True, "fingerprint": self.fingerprint, "step": self.step})

    # -- evaluation ------------------------------------------------------------------------------

    def _evaluate_and_select(self) -> dict[str, float]:
        scores: dict[str, float] = {}
        if self.runtime.is_main:
            was_training = self.module.training
            self.module.eval()
            with torch.inference_mode(), self.runtime.autocast():
                scores = {d: float(v) for d, v in self.evaluate(self.module).items()}
            self.module.train(was_training)
            avg = sum(scores.values()) / max(1, len(scores))
            candidates = {**scores, SHARED: avg}
            improved = [k for k in self.selection_keys
                        if k in candidates and (k not in self.best or candidates[k] > self.best[k].dev)]
            if improved:
                path = self._best_path(self.step)
                state = {k: v.detach().to("cpu").clone() for k, v in self.snapshot(self.module).items()}
                with atomic_file(path, "wb") as handle:
                    torch.save(state, handle)
                for k in improved:
                    self.best[k] = Selection(step=self.step, dev=candidates[k])
                keep = {self._best_path(s.step).name for s in self.best.values()}
                for old in path.parent.glob("step-*.pt"):
                    if old.name not in keep:
                        old.unlink()
            self.history.append({"step": self.step, **{f"dev/{d}": v for d, v in scores.items()}, "dev/avg": avg})
            pretty = " ".join(f"{d}={v:.4f}" for d, v in scores.items())
            log.info("%s step %d/%d dev acc %s avg=%.4f", self.desc, self.step, self.total_steps, pretty, avg)
        self.runtime.barrier()
        return scores

    # -- main loop -------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        resumed = self._try_resume()
        if resumed and self.runtime.is_main:
            self._restore_live()
        if not resumed:
            self._reset_resume_dir()
        live = self._open_live(resumed)
        self.module.train()
        steps_per_epoch = self.schedule.steps_per_epoch
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.desc,
            disable=not (self.runtime.is_main and self.engine.progress),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        device = self.runtime.device
        if self.runtime.is_main and (ready := seconds_since_process_start()) is not None:
            # What a stage pays before its first step (imports, models, data): issue 13's start-up.
            log.info("%s: first step %.1f s after the process started", self.desc, ready)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        running = torch.zeros((), device=device)
        running_n = 0
        epoch_cache: tuple[int, list[Step]] | None = None
        try:
            while self.step < self.total_steps:
                epoch, within = divmod(self.step, steps_per_epoch)
                if epoch_cache is None or epoch_cache[0] != epoch:
                    epoch_cache = (epoch, self.schedule.epoch(epoch))
                batch = self.make_batch(epoch_cache[1][within])
                with self.runtime.autocast():
                    loss, logs = self.wrapped(batch)
                self._backward_and_step(loss)
                self.step += 1
                bar.update(1)
                detached = loss.detach().float()
                # Record the first non-finite step on-device: no host sync on the hot path.
                first_bad = torch.where((~torch.isfinite(detached)) & (first_bad < 0), self.step, first_bad)
                running += torch.nan_to_num(detached)
                running_n += 1
                at_eval = self.step % self.settings.eval_every == 0 or self.step == self.total_steps
                if self.step % self.engine.log_every == 0 or at_eval:
                    self._check_finite(first_bad)
                    mean_loss = float(running) / running_n
                    running.zero_()
                    running_n = 0
                    bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
                    if live is not None:
                        live.step = self.step
                        live.log_metric("train/loss", mean_loss)
                        live.log_metric("train/lr", self.scheduler.get_last_lr()[0])
                        for name, value in logs.items():
                            live.log_metric(f"train/{name}", float(value))
                if at_eval:
                    scores = self._evaluate_and_select()
                    if live is not None and scores:
                        live.step = self.step
                        for d, v in scores.items():
                            live.log_metric(f"dev/{d}/acc", v)
                        live.log_metric("dev/avg/acc", sum(scores.values()) / len(scores))
                        live.make_summary()
                    self._save_state()
                for callback in self.callbacks:
                    callback(self)
        finally:
            bar.close()
            if live is not None:
                live.end()
        return TrainResult(best=dict(self.best), steps=self.step, history=list(self.history))

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            if self.settings.max_grad_norm:
                nn.utils.clip_grad_norm_(self.module.parameters(), self.settings.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.settings.max_grad_norm:
                nn.utils.clip_grad_norm_(self.module.parameters(), self.settings.max_grad_norm)
            self.optimizer.step()
        self.scheduler.step()

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        bad = int(first_bad)
        if bad >= 0:
            epoch = (bad - 1) // self.schedule.steps_per_epoch + 1
            raise NonFiniteLoss(
                f"{self.desc}: the loss became NaN/inf at step {bad} (epoch {epoch}); stopped without saving it. "
                f"Lower the learning rate (now {self.settings.lr:g}) or check the inputs; "
                f"the last good checkpoint is in {self.resume_dir}"
            )

    def _open_live(self, resumed: bool):
        if self.live_dir is None or not self.runtime.is_main:
            return None
        from dvclive import Live

        return Live(dir=str(self.live_dir), resume=resumed, dvcyaml=False, save_dvc_exp=False, report=None)


# ---------------------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------------------


def accuracy(predictions: Iterable[torch.Tensor], labels: Iterable[torch.Tensor]) -> float:
    correct = total = 0
    for p, y in zip(predictions, labels):
        correct += int((p == y).sum())
        total += int(y.numel())
    return correct / total if total else math.nan
