"""Meta-distillation (spec 1c): one student per domain from the meta-teacher (method ``metakd``).

Student k is trained on domain k's rows only (like ``tinybert-kd``), from the meta-teacher
checkpoint selected for domain k. Its loss terms, per example i:

* L_hid,i = sum_{j=0..M} MSE(W_f H^S_j, H^T_{map(j)})   (j = 0: embeddings, the paper's L_embd;
  map = :func:`hrkd.losses.uniform_layer_map`, teacher level 3j for 4 of 12 layers); ONE shared W_f;
* L_att,i = sum_{j=1..M} MSE(A^S_j, A^T_{map(j)}) on pre-softmax scores, padded keys zeroed;
* L_TKD   = MSE(W_f r^S, r^T), r = W_d (h-bar + e_k) + b_d (no tanh) - batch-averaged first (code);
  r^T from the meta-teacher's branch, r^S from the student's own random e (K x H_s) and W_d;
* lambda_i = (1 + t_i) / (1 + exp((1 - p_i)^2)), p_i = softmax(z^T_i)[y_i].

``metakd.distill.schedule``:

* ``two-stage`` (default, the authors' code): stage A minimises mean_i lambda_i (L_hid,i + L_att,i +
  gamma2 L_TKD) with a constant learning rate and keeps the last student; stage B starts from it
  and minimises the soft cross-entropy to the teacher's logits (batch mean, no lambda) with
  warmup-linear decay, keeping the best dev checkpoint;
* ``joint`` (the paper's single objective): mean_i lambda_i (L_hid,i + L_att,i + gamma2 L_TKD +
  L_pred,i) on stage B's schedule, best dev checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from hrkd.config import Params, TrainSettings
from hrkd.data.loading import Schedule, TaskSplits, shard
from hrkd.distill.teacher_models import load_teachers, teacher_checkpoints
from hrkd.driver import Context, Run, RunPaths, drive
from hrkd.engine import Callback, Job, Runtime, fingerprint, seed_everything
from hrkd.errors import HRKDError
from hrkd.io import atomic_file, read_json
from hrkd.losses import mse, soft_cross_entropy, uniform_layer_map
from hrkd.metakd.losses import (
    expertise_weights,
    masked_positions_mean,
    per_example_attention_mse,
    per_example_mse,
    per_example_soft_ce,
    weighted_mean,
)
from hrkd.metakd.teacher import DomainBranch, MetaBatch, load_branch, make_meta_batch
from hrkd.models import MultiDomainBert, Taps

log = logging.getLogger("hrkd.metakd.distill")

METHOD = "metakd"
TEACHER_KIND = "meta"
STAGES = ("intermediate", "prediction", "joint")
STAGE_A_STUDENT = "student.pt"  # stage A's final student, kept only until the domain's run completes


@dataclass
class MetaTeacher:
    """A frozen meta-teacher checkpoint: classifier + domain branch (eval mode, no gradients)."""

    model: nn.Module
    branch: DomainBranch
    mask_padding: bool


def load_meta_teacher(path: str | Path, num_labels: int, domains: Sequence[str], device: torch.device) -> MetaTeacher:
    """Load one saved meta-teacher domain folder (classifier + ``metakd_branch``) for distillation."""
    branch, meta = load_branch(path)
    if list(meta.get("domains", [])) != list(domains):
        raise HRKDError(f"{path} was trained on domains {meta.get('domains')} but the task has {list(domains)}; "
                        "retrain the meta-teacher on this task")
    model = load_teachers({"teacher": path}, num_labels, device)[0].model
    return MetaTeacher(model=model, branch=branch.to(device), mask_padding=bool(meta["mask_padding"]))


def metakd_settings(params: Params) -> tuple[TrainSettings, TrainSettings]:
    """(stage A, stage B) schedules of the active profile; the top-level ``lr`` overrides stage B's rate.

    Stage B (and the ``joint`` schedule) is the run that trains the deployed prediction layer, i.e.
    "the student learning rate" of every other method; stage A keeps its own constant rate.
    """
    prof = params.active
    stage_b = prof.metakd_stage_b
    if params.lr is not None:
        stage_b = stage_b.model_copy(update={"lr": params.lr})
    return prof.metakd_stage_a, stage_b


class MetaDistillObjective(nn.Module):
    """The engine's trainable module for one Meta-KD stage; ``forward(MetaBatch) -> (loss, logs)``.

    Owns the student and, for ``intermediate``/``joint``, W_f (``proj``) and the student's domain
    branch (e, W_d). The teacher sits in a plain list: not a parameter, not in state dicts,
    snapshots, resume states or DDP, and ``train()`` cannot switch its dropout on.
    """

    def __init__(self, student: nn.Module, teacher: MetaTeacher, *, stage: str, num_domains: int,
                 tkd_weight: float = 0.5, temperature: float = 1.0, class_mean: bool = False,
                 mask_queries: bool = False,
                 teacher_autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        super().__init__()
        if stage not in STAGES:
            raise HRKDError(f"unknown Meta-KD stage '{stage}': use one of {list(STAGES)}")
        self.student = student
        self.stage = stage
        self.gamma2 = float(tkd_weight)
        self.temperature = float(temperature)
        self.class_mean = class_mean
        self.mask_queries = mask_queries
        self.mask_padding = teacher.mask_padding
        self._teacher = [teacher]
        # The autocast of the teacher's forwards (Runtime.teacher_autocast); default: the step's.
        self.teacher_autocast = teacher_autocast
        if stage == "prediction":
            return

        tcfg = teacher.model.config
        if int(tcfg.num_attention_heads) != student.num_attention_heads:
            raise HRKDError(f"teacher has {tcfg.num_attention_heads} attention heads, the student "
                            f"{student.num_attention_heads}: L_att pairs heads one to one; use matching models")
        M, Hs, Ht = student.num_layers, student.hidden_size, int(tcfg.hidden_size)
        self.layer_map = uniform_layer_map(M, int(tcfg.num_hidden_layers))
        std = getattr(student.config, "initializer_range", 0.02)
        # W_f: one projection shared by every hidden level and by r^S (the authors' single fit_dense).
        self.proj = nn.Linear(Hs, Ht)
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)
        self.branch = DomainBranch(Hs, num_domains, classifier=False, init_std=std)
        self._student_taps = Taps(hidden=True, attention_layers=frozenset(range(1, M + 1)))
        self._teacher_taps = Taps(hidden=True, attention_layers=frozenset(self.layer_map))

    @property
    def teacher(self) -> MetaTeacher:
        return self._teacher[0]

    def forward(self, mb: MetaBatch) -> tuple[Tensor, dict[str, Tensor]]:
        b = mb.batch
        t_model = self.teacher.model
        if self.stage == "prediction":
            s = self.student(b.input_ids, b.attention_mask, b.token_type_ids)
            with torch.inference_mode(), self.teacher_autocast():
                t_logits = t_model(b.input_ids, b.attention_mask, b.token_type_ids).logits
            loss = soft_cross_entropy(s.logits.float(), t_logits.float(), self.temperature, class_mean=self.class_mean)
            return loss, {"pred": loss.detach()}
        mask = b.attention_mask
        pool_mask = mask if self.mask_padding else None
        s = self.student(b.input_ids, mask, b.token_type_ids, taps=self._student_taps)
        with torch.inference_mode(), self.teacher_autocast():
            t = t_model(b.input_ids, mask, b.token_type_ids, taps=self._teacher_taps)
            r_t = self.teacher.branch.features(masked_positions_mean(t.last_hidden, pool_mask), b.domain_ids)
        lam = expertise_weights(t.logits, b.labels, mb.weights)
        hid = per_example_mse(self.proj(s.embeddings), t.embeddings)
        att = torch.zeros_like(hid)
        for m, n in enumerate(self.layer_map, start=1):
            hid = hid + per_example_mse(self.proj(s.hidden_states[m - 1]), t.hidden_states[n - 1])
            att = att + per_example_attention_mse(s.attention_scores[m], t.attention_scores[n], mask,
                                                  mask_queries=self.mask_queries)
        r_s = self.branch.features(masked_positions_mean(s.last_hidden, pool_mask), b.domain_ids)
        tkd = mse(self.proj(r_s).float(), r_t.float())  # a batch scalar, as the authors compute it
        per_example = hid + att + self.gamma2 * tkd
        logs = {"hid": hid.detach().mean(), "att": att.detach().mean(), "tkd": tkd.detach(),
                "lambda": lam.detach().mean()}
        if self.stage == "joint":
            pred = per_example_soft_ce(s.logits, t.logits, self.temperature, class_mean=self.class_mean)
            per_example = per_example + pred
            logs["pred"] = pred.detach().mean()
        return weighted_mean(per_example, lam), logs

    def snapshot_state(self) -> dict[str, Tensor]:
        """What a best checkpoint keeps: the student only (W_f and the branch are dropped at inference)."""
        return {f"student.{k}": v for k, v in self.student.state_dict().items()}

    def load_snapshot(self, state: Mapping[str, Tensor]) -> None:
        self.student.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")})


@dataclass
class MetaKDPlan:
    """Meta-distillation of one student per domain (one seed), for :func:`hrkd.driver.drive`."""

    task: TaskSplits
    params: Params
    seed: int
    checkpoints: dict[str, Path]
    pretrained: Path
    runtime: Runtime
    scores: Sequence[Tensor]
    stage_a: TrainSettings
    stage_b: TrainSettings
    fewshot: bool = False
    role: str = "student"

    @property
    def label(self) -> str:
        return f"student {self.task.name}/{METHOD}"

    @property
    def two_stage(self) -> bool:
        return self.params.metakd.distill.schedule == "two-stage"

    def metadata(self) -> dict[str, Any]:
        opts = self.params.metakd.distill
        return {"role": "student", "method": METHOD, "teacher": TEACHER_KIND, "run": METHOD, "task": self.task.name,
                "seed": self.seed, "fewshot": self.fewshot, "schedule": opts.schedule, "metakd": opts.model_dump(),
                "settings": self.stage_b.model_dump(), "stage_a": self.stage_a.model_dump() if self.two_stage else None,
                "max_seq_len": self.params.active.max_seq_len}

    def runs(self, ctx: Context) -> Iterator[Run]:
        task, params, runtime, scores = self.task, self.params, self.runtime, self.scores
        opts = params.metakd.distill
        run_seed = self.seed + params.distill.seed_offset
        D = len(task.domains)
        for d, dname in enumerate(task.domains):
            teacher = load_meta_teacher(self.checkpoints[dname], len(task.labels), task.domains, runtime.device)
            # Seeded right before the student, W_f and the student's branch are built: reproducible runs.
            seed_everything(run_seed)
            student = MultiDomainBert.from_pretrained(self.pretrained, num_labels=len(task.labels), domains=None)

            def objective(stage: str, _teacher=teacher, _student=student) -> MetaDistillObjective:
                return MetaDistillObjective(_student, _teacher, stage=stage, num_domains=D,
                                            tkd_weight=opts.tkd_weight, temperature=opts.temperature,
                                            class_mean=opts.class_mean, mask_queries=opts.mask_queries,
                                            teacher_autocast=runtime.teacher_autocast)

            def make_batch(step):
                return make_meta_batch(task, "train", shard(step, runtime.rank, runtime.world), scores, runtime.device)

            def schedule(settings: TrainSettings, _d=d) -> Schedule:
                return Schedule(kind="single", sizes=tuple(task.sizes("train")), batch_size=settings.batch_size,
                                seed=run_seed, domain=_d, lengths=task.lengths("train"),
                                group_by_length=settings.group_by_length)

            base = {"method": METHOD, "teacher": TEACHER_KIND, "task": task.name, "domain": dname, "seed": run_seed,
                    "metakd": opts.model_dump(), "sizes": task.sizes("train"),
                    "max_seq_len": params.active.max_seq_len, "fewshot": self.fewshot,
                    "teacher_path": str(self.checkpoints[dname]), "pretrained": str(self.pretrained),
                    "world": runtime.world, "t": [round(float(scores[d].double().sum()), 6), len(scores[d])]}
            desc = f"{self.label}/{dname}"
            if self.two_stage:
                cfg_a = {**base, "stage": "intermediate", "settings": self.stage_a.model_dump()}
                job_a = Job(module=objective("intermediate"), make_batch=make_batch, schedule=schedule(self.stage_a),
                            settings=self.stage_a,
                            # No model selection in stage A: the prediction layer is untrained, so dev
                            # accuracy means nothing.
                            evaluate=lambda module: {}, domains=[], config=cfg_a,
                            find_unused_parameters=True,  # the student's classifier gets no gradient in stage A
                            desc=desc + " (stage A)")
                _stage_a(job_a, ctx, f"{dname}/stage-a")
                seed_everything(run_seed)  # stage B's dropout stream does not depend on how stage A ended
                final = objective("prediction")
                cfg_b = {**base, "stage": "prediction", "settings": self.stage_b.model_dump(), "after": fingerprint(cfg_a)}
                subdir = f"{dname}/stage-b"
            else:
                final = objective("joint")
                cfg_b = {**base, "stage": "joint", "settings": self.stage_b.model_dump()}
                subdir = dname
            yield Run(module=final, model=student, make_batch=make_batch, schedule=schedule(self.stage_b),
                      settings=self.stage_b, domains=[d], config=cfg_b, desc=desc + (" (stage B)" if self.two_stage else ""),
                      restore=final.load_snapshot, snapshot=lambda m: m.snapshot_state(), subdir=subdir)
            if self.two_stage and runtime.is_main:
                # The domain is complete: its stage-A student is no longer needed to resume.
                (ctx.paths.resume / dname / "stage-a" / STAGE_A_STUDENT).unlink(missing_ok=True)
            del final, teacher, student

    def summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"method": METHOD, "teacher": TEACHER_KIND, "run": METHOD, "task": self.task.name, "seed": self.seed,
                "domains": self.task.domains, "labels": self.task.labels, "lr": self.stage_b.lr,
                "fewshot": self.fewshot, "schedule": self.params.metakd.distill.schedule,
                "stage_a": self.stage_a.model_dump() if self.two_stage else None,
                "stage_b": self.stage_b.model_dump(), "metrics": metrics}


def distill_metakd(
    *,
    task: TaskSplits,
    params: Params,
    seed: int,
    teacher_dir: str | Path,
    pretrained_student: str | Path,
    tokenizer: Any,
    runtime: Runtime,
    paths: RunPaths,
    scores: Sequence[Tensor] | None,
    fewshot: bool = False,
    settings: tuple[TrainSettings, TrainSettings] | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Meta-distil one student per domain; write ``paths.out/<domain>/`` classifiers, ``student.json`` and metrics.

    ``scores``: per-domain t tensors (:func:`hrkd.metakd.scores.load_scores`); ``settings``: (stage A,
    stage B), default :func:`metakd_settings`.
    """
    if scores is None:
        raise HRKDError(f"metakd needs the transferability scores: run `dvc repro metakd_scores@{task.name}` "
                        "and pass them (scores=load_scores(...))")
    stage_a, stage_b = settings or metakd_settings(params)
    if len(scores) != len(task.domains) or any(len(scores[d]) != n for d, n in enumerate(task.sizes("train"))):
        raise HRKDError("the transferability scores do not match the task's training rows; "
                        f"rerun `dvc repro metakd_scores@{task.name}`")
    teacher_dir = Path(teacher_dir)
    if not any((teacher_dir / d / "config.json").is_file() for d in task.domains):
        raise HRKDError(f"no meta-teacher in {teacher_dir}: run `dvc repro train_meta_teacher@{task.name}` first")
    checkpoints = teacher_checkpoints(teacher_dir, task.name, TEACHER_KIND, task.domains,
                                      params.distill.teacher_checkpoint)
    plan = MetaKDPlan(task, params, seed, checkpoints, Path(pretrained_student), runtime, scores, stage_a, stage_b,
                      fewshot)
    return drive(plan, task=task, tokenizer=tokenizer, runtime=runtime, engine=params.engine, paths=paths,
                 metadata=plan.metadata(), callbacks=callbacks)


def _stage_a(job: Job, ctx: Context, subdir: str) -> None:
    """Stage A: the lambda-weighted intermediate-layer loss; the LAST student is kept (no dev selection).

    Its final student is saved in the resume folder, so a run killed during stage B does not
    repeat stage A; the file goes when the domain's run completes.
    """
    resume = ctx.paths.resume / subdir
    saved = resume / STAGE_A_STUDENT
    status = resume / "status.json"
    student = job.module.student
    if saved.is_file() and status.is_file():
        done = read_json(status)
        if done.get("complete") and done.get("fingerprint") == fingerprint(job.config):
            student.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
            log.info("%s: stage A already complete in %s; continuing with stage B", job.desc, resume)
            return
    trainer, _ = ctx.fit(job, subdir)
    trainer.finish()
    if ctx.runtime.is_main:
        state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
        with atomic_file(saved, "wb") as handle:
            torch.save(state, handle)
    ctx.runtime.barrier()
