"""The distillation objective of HRKD section 2: eqs. 1-5 and, for the HRKD methods, eqs. 6-17.

:class:`KDObjective` is the engine's trainable module. It owns the student, the projections
W^embd / W_m^hidn and (HRKD methods) the :class:`~hrkd.relational.HierarchicalRelational` graph.
Teachers are deliberately *not* submodules: they sit in a plain list, so the optimiser, the
resume state, the best-checkpoint snapshots and DDP never see them, and ``objective.train()``
cannot switch their dropout on.

The per-domain losses are the pure functions of :mod:`hrkd.losses`; this module only routes
rows: student rows of domain d are compared with the outputs of domain d's teacher.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from hrkd.config import Distill
from hrkd.data.loading import Batch, Step, TaskSplits, collate
from hrkd.errors import HRKDError
from hrkd.losses import (
    attention_loss,
    embedding_loss,
    hidden_loss,
    layer_losses,
    robust_ratio_loss,
    soft_cross_entropy,
    total_kd_loss,
    uniform_layer_map,
)
from hrkd.distill.teacher_cache import TeacherCache, TeacherView
from hrkd.relational import (
    ONE_HOT_ENTROPY,
    UNIFORM_SPREAD,
    HierarchicalRelational,
    layer_prototypes,
    layer_regimes,
    ratio_diagnostics,
    ratio_regime,
    stack_domain_prototypes,
)

log = logging.getLogger("hrkd.distill")

METHODS = (
    "tinybert-kd",
    "multi-domain-kd",
    "no-domain-rel",
    "hrkd",
    "no-self-attention",
    "no-comp-agg",
    "no-hierarchical",
    "hrkd-dro",
    "hrkd-frozen",
)
# Methods whose total is eq. 17 with ratios from the relational graph (HRKD, its ablations and
# the robust-ratio variant).
HRKD_METHODS = frozenset({"hrkd", "no-self-attention", "no-comp-agg", "no-hierarchical", "hrkd-dro", "hrkd-frozen"})
# HRKD with its ratios fixed to one way of learning, whatever distill.ratios says: so one
# pipeline can put the paper's graph, the authors' frozen one and the robust one side by side.
FIXED_RATIO_LEARNING = {"hrkd-dro": "dro", "hrkd-frozen": "frozen"}
TEACHER_KINDS = ("single", "mix", "mtl", "hrkd")
SHARED_TEACHERS = "_shared"  # the teacher stage's one-checkpoint-for-all-domains folder
RELATIONAL_DIR = "_relational"  # student encoder + graph state, for Tables 5-6
GRAPH_FILE = "graph.pt"
PROJ_FILE = "projections.pt"  # W^embd, W_m^hidn, saved when prototypes are projected
GRAPH_META = "relational.json"


def check_method(method: str, teacher_kind: str) -> None:
    """Reject unknown method / teacher-kind names with a one-line fix."""
    if method not in METHODS:
        raise HRKDError(f"unknown distillation method '{method}': choose one of {list(METHODS)}")
    if teacher_kind not in TEACHER_KINDS:
        raise HRKDError(f"unknown teacher kind '{teacher_kind}': choose one of {list(TEACHER_KINDS)}")


def ratio_learning(method: str, distill: Distill) -> str:
    """How the method's graph learns: ``paper``, ``frozen`` or ``dro`` (``distill.ratios`` unless fixed)."""
    return FIXED_RATIO_LEARNING.get(method, distill.ratios)


def graph_arguments(method: str, distill: Distill, num_layers: int, num_domains: int, feature_dim: int) -> dict[str, Any]:
    """Constructor arguments of the method's graph (JSON-able, saved next to its state)."""
    learning = ratio_learning(method, distill)
    return {
        "num_layers": num_layers,
        "num_domains": num_domains,
        "feature_dim": feature_dim,
        "graph_hidden": distill.graph_hidden,
        "graph_heads": distill.graph_heads,
        "dropout": distill.graph_dropout,
        "self_attention": method != "no-self-attention",
        "comp_agg": method != "no-comp-agg",
        "hierarchical": method != "no-hierarchical",
        # dro needs the skip term: without it r is exactly 1/D whenever a layer's scores share a
        # sign, and has no gradient there to learn from.
        "graph_skip": distill.graph_skip or learning == "dro",
        # dro also drops the ELU on the graph's output: under the KL pull toward uniform, training
        # drives every node's layer-2 input far below 0, where ELU = -1 exactly (r = 1/D to fp32)
        # and its gradient exp(x) vanishes, so r stays uniform for good (docs/hrkd-method.md).
        "graph_output_elu": learning != "dro",
        "ratios": learning,
        "dro_tau": distill.dro_tau,
        "prototype_features": distill.prototype_features,
    }


# ---------------------------------------------------------------------------------------------
# Batches: the collated step plus where each domain's rows are
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillBatch:
    """A training step for :class:`KDObjective`.

    ``batch.domain_ids`` are the objective's *local* domain indices (0..D-1) and ``spans[d]`` is
    the [start, stop) row range of local domain d. Ranges are host ints worked out from the
    schedule step, so slicing a domain's rows is a view with no device-to-host sync.
    """

    batch: Batch
    spans: tuple[tuple[int, int], ...]
    # rows[d]: domain d's row indices in its split (host tensor), for the teacher cache; () when
    # the batch was not built from a schedule step.
    rows: tuple[Tensor, ...] = ()


def make_distill_batch(task: TaskSplits, split: str, step: Step, domains: Sequence[int],
                       device: torch.device | None = None) -> DistillBatch:
    """Collate a schedule step (after :func:`~hrkd.data.loading.shard`) for an objective over ``domains``.

    ``domains`` are task domain indices in the objective's order; every one must appear exactly
    once in the step with at least one row (multi-domain KD sums over all D domains each step).
    """
    local = {d: i for i, d in enumerate(domains)}
    spans: list[tuple[int, int] | None] = [None] * len(domains)
    rows: list[Tensor | None] = [None] * len(domains)
    ids: list[Tensor] = []
    start = 0
    for d, idx in step:
        if d not in local or spans[local[d]] is not None:
            raise ValueError(f"step has rows of domain {d} that the objective over {list(domains)} does not expect")
        n = len(idx)
        spans[local[d]] = (start, start + n)
        rows[local[d]] = idx
        ids.append(torch.full((n,), local[d], dtype=torch.long))
        start += n
    empty = [task.domains[domains[i]] for i, s in enumerate(spans) if s is None or s[0] == s[1]]
    if empty:
        raise HRKDError(
            f"a training step has no rows of domain(s) {empty} on this process: every step must see every domain; "
            "lower engine.nproc or raise the student batch_size"
        )
    batch = collate(task, split, step)
    batch = Batch(batch.input_ids, batch.attention_mask, batch.token_type_ids, batch.labels, torch.cat(ids))
    if device is not None:
        batch = batch.to(device)
    return DistillBatch(batch=batch, spans=tuple(spans), rows=tuple(rows))  # type: ignore[arg-type]


def _padded(db: DistillBatch, width: int) -> DistillBatch:
    """The same rows padded to ``width`` positions (padding is masked, so real positions are unchanged)."""
    b = db.batch

    def pad(t: Tensor) -> Tensor:
        return nn.functional.pad(t, (0, width - t.shape[1]))

    return DistillBatch(Batch(pad(b.input_ids), pad(b.attention_mask), pad(b.token_type_ids), b.labels, b.domain_ids),
                        db.spans, db.rows)


def concat_domain_batches(batches: Sequence[Batch]) -> DistillBatch:
    """One batch per domain -> a :class:`DistillBatch` padded to their common width (as in training)."""
    if not batches or any(len(b) == 0 for b in batches):
        raise HRKDError("need a non-empty batch of examples for every domain; pass at least one row per domain")
    width = max(b.input_ids.shape[1] for b in batches)

    def pad(t: Tensor) -> Tensor:
        return nn.functional.pad(t, (0, width - t.shape[1]))

    spans, start = [], 0
    for b in batches:
        spans.append((start, start + len(b)))
        start += len(b)
    device = batches[0].input_ids.device
    batch = Batch(
        torch.cat([pad(b.input_ids) for b in batches]),
        torch.cat([pad(b.attention_mask) for b in batches]),
        torch.cat([pad(b.token_type_ids) for b in batches]),
        torch.cat([b.labels for b in batches]),
        torch.cat([torch.full((len(b),), d, dtype=torch.long, device=device) for d, b in enumerate(batches)]),
    )
    return DistillBatch(batch=batch, spans=tuple(spans))


# ---------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------


@dataclass
class TeacherGroup:
    """One loaded teacher encoder serving one or more of the objective's domains.

    Domains whose checkpoints hold the same encoder (the ``shared`` teacher, or one path listed
    twice) share a model with one head per domain, so their rows go through ONE teacher forward.
    ``domains`` are local domain indices; ``head_of`` maps them to this model's head index.
    """

    model: nn.Module
    domains: tuple[int, ...]
    head_of: Tensor  # [D] local domain -> head index here (-1 if not served by this group)


def teacher_checkpoints(teacher_dir: str | Path, task: str, kind: str, domains: Sequence[str],
                        checkpoint: str) -> dict[str, Path]:
    """The teacher directory each domain is distilled from (``distill.teacher_checkpoint``)."""
    teacher_dir = Path(teacher_dir)
    fix = f"run `dvc repro train_teacher@{task}-{kind}` first"
    if checkpoint == "shared":
        if kind == "single":
            raise HRKDError(
                "distill.teacher_checkpoint=shared needs one checkpoint for all domains, which the 'single' teacher "
                "kind does not have (one model per domain); use distill.teacher_checkpoint=per-domain"
            )
        paths = {d: teacher_dir / SHARED_TEACHERS / d for d in domains}
    elif checkpoint == "per-domain":
        paths = {d: teacher_dir / d for d in domains}
    else:
        raise HRKDError(f"unknown distill.teacher_checkpoint '{checkpoint}': use per-domain or shared")
    missing = [str(p) for p in paths.values() if not (p / "config.json").is_file()]
    if missing:
        raise HRKDError(f"teacher checkpoint {missing[0]} not found: {fix}")
    return paths


def _same_encoder(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def load_teachers(paths: Mapping[str, str | Path], num_labels: int, device: torch.device) -> list[TeacherGroup]:
    """Load per-domain teacher classifiers (frozen, eval mode, on ``device``), merging identical encoders.

    ``paths`` maps the objective's domains, in order, to classifier directories.
    """
    from hrkd.models import MultiDomainBert

    names = list(paths)
    by_path: dict[Path, Any] = {}
    # fork_rng: building heads draws from the global RNG; loading teachers must not shift the
    # student's initialisation (runs stay comparable across teacher_checkpoint settings).
    with torch.random.fork_rng(devices=[]):
        for name in names:
            key = Path(paths[name]).resolve()
            if key not in by_path:
                by_path[key] = MultiDomainBert.from_classifier(key, num_labels=num_labels)
        loaded = [by_path[Path(paths[n]).resolve()] for n in names]
        groups: list[list[int]] = []
        for i, model in enumerate(loaded):
            for group in groups:
                if loaded[group[0]] is model or _same_encoder(loaded[group[0]].encoder, model.encoder):
                    group.append(i)
                    break
            else:
                groups.append([i])
        out = []
        for group in groups:
            first = loaded[group[0]]
            if len(group) == 1:
                model = first
            else:
                model = MultiDomainBert(first.encoder, num_labels=num_labels, domains=[names[i] for i in group],
                                        dropout=first.dropout.p)
                for h, i in enumerate(group):
                    model.heads[h].load_state_dict(loaded[i].heads[0].state_dict())
            model.eval().requires_grad_(False).to(device)
            head_of = torch.full((len(names),), -1, dtype=torch.long)
            head_of[group] = torch.arange(len(group))
            out.append(TeacherGroup(model=model, domains=tuple(group), head_of=head_of.to(device)))
    if len(out) < len(names):
        log.info("teachers: %d domains served by %d distinct teacher encoder(s)", len(names), len(out))
    return out


@dataclass
class _TeacherView:
    """Domain d's rows [a, z) of a teacher forward."""

    out: Any
    a: int
    z: int

    @property
    def embeddings(self) -> Tensor:
        return self.out.embeddings[self.a:self.z]

    def hidden(self, layer: int) -> Tensor:
        return self.out.hidden_states[layer - 1][self.a:self.z]

    def scores(self, layer: int) -> Tensor:
        return self.out.attention_scores[layer][self.a:self.z]

    @property
    def logits(self) -> Tensor:
        return self.out.logits[self.a:self.z]


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainLosses:
    """Per-domain loss terms of one step: embd [D], attn [M, D], hidn [M, D], pred [D]."""

    embd: Tensor
    attn: Tensor
    hidn: Tensor
    pred: Tensor


class KDObjective(nn.Module):
    """TinyBERT-style multi-domain KD (eq. 5) or HRKD (eq. 17); ``forward(DistillBatch) -> (loss, logs)``.

    ``teachers`` is what :func:`load_teachers` returns for the objective's D domains, or None
    for a student-only objective (relational ratios, a reloaded student).
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[TeacherGroup] | None,
        *,
        num_domains: int,
        method: str,
        distill: Distill,
        teacher_layers: int,
        teacher_hidden: int,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise HRKDError(f"unknown distillation method '{method}': choose one of {list(METHODS)}")
        self.student = student
        self.method = method
        self.num_domains = num_domains
        self.multi_head = len(student.heads) > 1
        if self.multi_head and len(student.heads) != num_domains:
            raise HRKDError(f"student has {len(student.heads)} heads for {num_domains} domains; build one head per domain")
        self.gamma = float(distill.gamma)
        self.temperature = float(distill.temperature)
        self.class_mean = distill.class_mean
        self.mask_queries = distill.mask_queries
        self.prototype_padding = distill.prototype_padding
        M, Hs = student.num_layers, student.hidden_size
        self.layer_map = uniform_layer_map(M, teacher_layers)  # student m -> teacher n (1-based)
        # proj[0] = W^embd (eq. 1), proj[m] = W_m^hidn (eq. 4): the authors' fit_denses, bias on,
        # initialised like TinyBERT's (BERT init: N(0, initializer_range), zero bias).
        self.proj = nn.ModuleList(nn.Linear(Hs, teacher_hidden) for _ in range(M + 1))
        std = getattr(student.config, "initializer_range", 0.02)
        for layer in self.proj:
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        self.graph: HierarchicalRelational | None = None
        self.graph_args: dict[str, Any] | None = None
        self.lr_scales: dict[str, float] = {}
        if method in HRKD_METHODS:
            # F = student hidden size: the paper's raw student outputs; `projected` averages the
            # W^embd / W_m^hidn outputs at the teacher's width, as the authors (docs/distill.md).
            feature = teacher_hidden if distill.prototype_features == "projected" else Hs
            self.graph_args = graph_arguments(method, distill, M, num_domains, feature)
            self.graph = HierarchicalRelational(**_graph_ctor(self.graph_args))
            if self.graph_args["ratios"] == "dro" and distill.dro_graph_lr_scale != 1.0:
                self.lr_scales = {"graph.": float(distill.dro_graph_lr_scale)}  # read by engine.param_groups
            if self.graph_args["ratios"] == "frozen":
                # The authors' optimiser holds only the student: the graph stays at its random
                # init, while L_total's gradient still reaches the student through r.
                self.graph.requires_grad_(False)
        self._student_taps = _taps(hidden=True, layers=range(1, M + 1))
        self._teacher_taps = _taps(hidden=True, layers=self.layer_map)
        # A plain list, not nn.ModuleList: teachers are not parameters, state, or DDP's business.
        self.teachers: list[TeacherGroup] = list(teachers or [])
        # Set by the run when the training rows' teacher outputs fit in memory (engine.teacher_cache_gib).
        self.teacher_cache: TeacherCache | None = None
        # Set by the run (main process): check the ratios' regime every this many training steps.
        self.ratio_watch_every = 0
        self._watch_step = 0
        self._watch_regime: str | None = None
        if self.teachers:
            served = sorted(d for g in self.teachers for d in g.domains)
            if served != list(range(num_domains)):
                raise ValueError(f"teacher groups serve domains {served}, expected each of 0..{num_domains - 1} once")
            heads = {int(g.model.num_attention_heads) for g in self.teachers}
            if heads != {student.num_attention_heads}:
                raise HRKDError(
                    f"teacher attention heads {sorted(heads)} != student's {student.num_attention_heads}: eq. 3 pairs "
                    "heads one to one; use a student with the teacher's head count"
                )

    # -- teacher side ------------------------------------------------------------------------------

    def teacher_outputs(self, db: DistillBatch) -> Sequence[TeacherView]:
        """Every domain's teacher outputs for its own rows (constants: inference mode).

        With a :attr:`teacher_cache` and a batch that names its rows, a step whose rows were all
        seen before reads them from the cache; otherwise the teachers run once, at the cache's
        full width, and the step's rows are kept.
        """
        if not self.teachers:
            raise HRKDError("this objective has no teachers (loaded for inference only); pass teachers to distill")
        cache = self.teacher_cache
        width = db.batch.input_ids.shape[1]
        with torch.inference_mode():
            if cache is None or not db.rows or width > cache.width:
                return self._run_teachers(db)
            if (hit := cache.get(db.rows, width)) is not None:
                return hit
            cache.put(db.rows, self._run_teachers(_padded(db, cache.width)))
            return cache.read(db.rows, width)

    def enable_teacher_cache(self, sizes: Sequence[int], width: int, budget_gib: float) -> bool:
        """Cache the teachers' outputs of ``sizes[d]`` training rows per domain if they fit in ``budget_gib``."""
        if not self.teachers or budget_gib <= 0:
            return False
        teacher = self.teachers[0].model
        shape = dict(sizes=tuple(sizes), width=int(width), heads=teacher.num_attention_heads)
        need = TeacherCache.bytes_needed(layers=len(self.layer_map), hidden=teacher.hidden_size,
                                         labels=teacher.num_labels, **shape) / 2**30
        if need > budget_gib:
            log.info("teacher outputs recomputed every step: caching them would take %.2f GiB > "
                     "engine.teacher_cache_gib=%g", need, budget_gib)
            return False
        self.teacher_cache = TeacherCache(layers=self.layer_map, **shape)
        log.info("teacher outputs cached after their first step (%.2f GiB for %d rows)", need, sum(sizes))
        return True

    def _run_teachers(self, db: DistillBatch) -> list[_TeacherView]:
        b = db.batch
        views: list[_TeacherView | None] = [None] * self.num_domains
        for g in self.teachers:
            spans = [db.spans[d] for d in g.domains]
            contiguous = all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
            if contiguous:
                a, z = spans[0][0], spans[-1][1]
                head = g.head_of[b.domain_ids[a:z]] if len(g.domains) > 1 else 0
                out = g.model(b.input_ids[a:z], b.attention_mask[a:z], b.token_type_ids[a:z],
                              domain=head, taps=self._teacher_taps)
                for d, (s, e) in zip(g.domains, spans):
                    views[d] = _TeacherView(out, s - a, e - a)
            else:  # a shared encoder whose domains are not adjacent in the batch: one forward each
                for h, (d, (s, e)) in enumerate(zip(g.domains, spans)):
                    out = g.model(b.input_ids[s:e], b.attention_mask[s:e], b.token_type_ids[s:e],
                                  domain=h, taps=self._teacher_taps)
                    views[d] = _TeacherView(out, 0, e - s)
        return views  # type: ignore[return-value]

    # -- student side ------------------------------------------------------------------------------

    def student_outputs(self, db: DistillBatch):
        b = db.batch
        return self.student(b.input_ids, b.attention_mask, b.token_type_ids,
                            domain=b.domain_ids if self.multi_head else None, taps=self._student_taps)

    def domain_losses(self, db: DistillBatch, student_out, teacher_views: Sequence[_TeacherView]) -> DomainLosses:
        """L_embd^d, L_attn^{m,d}, L_hidn^{m,d}, L_pred^d (eqs. 1-4) from the pure losses."""
        mask = db.batch.attention_mask
        embd, pred = [], []
        attn: list[list[Tensor]] = [[] for _ in self.layer_map]
        hidn: list[list[Tensor]] = [[] for _ in self.layer_map]
        for d, (a, z) in enumerate(db.spans):
            t = teacher_views[d]
            p0 = self.proj[0]
            embd.append(embedding_loss(student_out.embeddings[a:z], t.embeddings, p0.weight, p0.bias).float())
            for i, n in enumerate(self.layer_map):
                m = i + 1
                attn[i].append(attention_loss(student_out.attention_scores[m][a:z], t.scores(n), mask[a:z],
                                              mask_queries=self.mask_queries).float())
                pm = self.proj[m]
                hidn[i].append(hidden_loss(student_out.hidden_states[i][a:z], t.hidden(n), pm.weight, pm.bias).float())
            # Logits in fp32: the soft CE's log-softmax is where bf16 would cost accuracy.
            pred.append(soft_cross_entropy(student_out.logits[a:z].float(), t.logits.float(), self.temperature,
                                           class_mean=self.class_mean))
        return DomainLosses(torch.stack(embd), torch.stack([torch.stack(r) for r in attn]),
                            torch.stack([torch.stack(r) for r in hidn]), torch.stack(pred))

    def prototypes(self, db: DistillBatch, student_out) -> Tensor:
        """Eq. 6 per domain from the student's raw outputs: [M+1, D, F] in fp32."""
        proj = self.proj if self.graph_args and self.graph_args.get("prototype_features") == "projected" else None
        return domain_prototypes(student_out, db, self.prototype_padding, proj)

    def relational(self, db: DistillBatch, student_out, *, detach: bool = False):
        """The graph's :class:`~hrkd.relational.RelationalOutput` for this step (fp32, autocast off).

        ``detach``: the graph reads the student's prototypes without sending them a gradient.
        """
        if self.graph is None:
            raise HRKDError(f"method '{self.method}' has no relational graph; use an HRKD method")
        protos = self.prototypes(db, student_out)
        if detach:
            protos = protos.detach()
        # The graph is tiny (D nodes); fp32 keeps the softmaxes of eqs. 8-16 exact under AMP.
        with torch.autocast(protos.device.type, enabled=False):
            return self.graph(protos)

    def forward(self, db: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if len(db.spans) != self.num_domains:
            raise ValueError(f"batch has {len(db.spans)} domain spans, objective expects {self.num_domains}")
        student_out = self.student_outputs(db)
        losses = self.domain_losses(db, student_out, self.teacher_outputs(db))
        ratios = weights = None
        logs: dict[str, Tensor] = {}
        adversary = None
        if self.graph is not None:
            dro = self.graph_args["ratios"] == "dro"
            ratios = self.relational(db, student_out, detach=dro).ratios
            if dro:
                # The student minimises eq. 17 at the graph's r; the graph maximises it, KL-regularised.
                weights = ratios.detach()
                adversary = robust_ratio_loss(ratios, layer_losses(losses.embd, losses.attn, losses.hidn).detach(),
                                              self.graph_args["dro_tau"])
                logs["ratio_objective"] = -adversary.detach()
            else:
                # r is not detached (authors): the loss's gradient reaches the student through r too.
                weights = ratios
            logs.update(ratio_logs(ratios))
            self._watch_ratios(ratios)
        loss = total_kd_loss(losses.embd, losses.attn, losses.hidn, losses.pred, self.gamma, weights)
        if adversary is not None:
            loss = loss + (adversary - adversary.detach())  # its gradient, not its value: loss stays eq. 17
        logs.update({
            "embd": losses.embd.detach().sum(),
            "attn": losses.attn.detach().sum(),
            "hidn": losses.hidn.detach().sum(),
            "pred": losses.pred.detach().sum(),
        })
        return loss, logs

    def _watch_ratios(self, ratios: Tensor) -> None:
        """Every ``ratio_watch_every`` training steps, warn once when the ratios' regime changes."""
        if not (self.training and self.ratio_watch_every):
            return
        self._watch_step += 1
        if self._watch_step % self.ratio_watch_every:
            return
        layers = layer_regimes(ratios)
        regime = ratio_regime(ratios)
        if regime == self._watch_regime:
            return
        self._watch_regime = regime
        if regime == "uniform":
            log.warning("step %d: HRKD ratios are uniform (1/D in every layer, spread < %g): eq. 17 is eq. 5 / D "
                        "here (docs/hrkd-method.md, 'Why the ratios collapse')", self._watch_step, UNIFORM_SPREAD)
        elif regime == "one-hot":
            hot = [m for m, r in enumerate(layers) if r == "one-hot"]
            log.warning("step %d: HRKD ratios are one-hot in layer(s) %s (normalised entropy < %g): intermediate KD "
                        "is off for all but one domain there; eq. 17's optimum is degenerate (docs/hrkd-method.md)",
                        self._watch_step, hot, ONE_HOT_ENTROPY)
        else:
            log.info("step %d: HRKD ratios are learned (neither uniform nor one-hot in any layer)", self._watch_step)

    # -- checkpoints -------------------------------------------------------------------------------

    def snapshot_state(self) -> dict[str, Tensor]:
        """What a best checkpoint keeps: the student (+ the graph), never teachers or projections."""
        state = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        if self.graph is not None:
            state.update({f"graph.{k}": v for k, v in self.graph.state_dict().items()})
        return state

    def load_snapshot(self, state: Mapping[str, Tensor]) -> None:
        self.student.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")})
        if self.graph is not None:
            self.graph.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("graph.")})


def domain_prototypes(student_out, db: DistillBatch, padding: bool, proj: Sequence[nn.Module] | None = None) -> Tensor:
    """Eq. 6 for every domain's rows of a step: [M+1, D, F] in fp32.

    ``proj``: W^embd, W_1^hidn..W_M^hidn; given, layer m's prototype averages proj[m]'s outputs
    (the authors' code) instead of the raw student outputs (the paper).

    ``padding`` True averages over all positions of the step's padded width (eq. 6 as written;
    the authors pad to a fixed 128, we to the step's longest row);
    False over real tokens only.
    """
    mask = db.batch.attention_mask
    layers = [student_out.embeddings, *student_out.hidden_states]
    if proj is not None:
        layers = [p(x) for p, x in zip(proj, layers)]
    return stack_domain_prototypes([
        layer_prototypes(layers[0][a:z].float(), [h[a:z].float() for h in layers[1:]], None if padding else mask[a:z])
        for a, z in db.spans
    ])


def _taps(hidden: bool, layers):
    from hrkd.models import Taps

    return Taps(hidden=hidden, attention_layers=frozenset(int(n) for n in layers))


def _graph_ctor(args: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("num_layers", "num_domains", "feature_dim", "graph_hidden", "graph_heads", "dropout",
            "self_attention", "comp_agg", "hierarchical", "graph_skip")
    # Graphs saved before graph_output_elu existed all had the ELU on their output.
    return {**{k: args[k] for k in keys}, "graph_output_elu": args.get("graph_output_elu", True)}


def ratio_logs(ratios: Tensor) -> dict[str, Tensor]:
    """:func:`~hrkd.relational.ratio_diagnostics` on device (no host sync on the hot path).

    The means over layers (``ratio_spread``, ``ratio_entropy``) and, per layer m, ``ratio/m<m>/``
    ``min``, ``max``, ``entropy`` (normalised) and ``dev`` (max |r - 1/D|).
    """
    r = ratios.detach().float()
    domains = r.shape[1]
    low, high = r.min(dim=1).values, r.max(dim=1).values
    entropy = -torch.special.xlogy(r, r).sum(dim=1)
    normalised = entropy / math.log(domains) if domains > 1 else torch.ones_like(entropy)
    deviation = (r - 1.0 / domains).abs().max(dim=1).values
    logs = {"ratio_spread": (high - low).mean(), "ratio_entropy": normalised.mean()}
    for m in range(r.shape[0]):
        logs.update({f"ratio/m{m}/min": low[m], f"ratio/m{m}/max": high[m], f"ratio/m{m}/entropy": normalised[m],
                     f"ratio/m{m}/dev": deviation[m]})
    return logs


# ---------------------------------------------------------------------------------------------
# Relational state on disk and the ratios of Tables 5-6
# ---------------------------------------------------------------------------------------------


def save_relational(objective: KDObjective, out_dir: str | Path, tokenizer, metadata: Mapping[str, Any]) -> Path:
    """Write the student encoder, the graph state and its constructor arguments (no teacher needed to reload)."""
    from hrkd.io import atomic_dir, write_json

    if objective.graph is None or objective.graph_args is None:
        raise HRKDError(f"method '{objective.method}' has no relational graph to save")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        objective.student.encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({k: v.detach().cpu() for k, v in objective.graph.state_dict().items()}, tmp / GRAPH_FILE)
        if objective.graph_args.get("prototype_features") == "projected":
            torch.save({k: v.detach().cpu() for k, v in objective.proj.state_dict().items()}, tmp / PROJ_FILE)
        write_json(tmp / GRAPH_META, {"graph": objective.graph_args, "method": objective.method,
                                      "prototype_padding": objective.prototype_padding, **metadata})
    return out_dir


@dataclass
class _RelationalProbe:
    student: nn.Module
    graph: HierarchicalRelational
    prototype_padding: bool
    domains: list[str] | None
    proj: nn.ModuleList | None = None


def load_relational(path: str | Path) -> _RelationalProbe:
    """Reload a saved student encoder + graph (``<student out>/_relational`` or that folder itself)."""
    from hrkd.io import read_json
    from hrkd.models import MultiDomainBert

    path = Path(path)
    if not (path / GRAPH_META).is_file() and (path / RELATIONAL_DIR / GRAPH_META).is_file():
        path = path / RELATIONAL_DIR
    if not (path / GRAPH_META).is_file() or not (path / GRAPH_FILE).is_file():
        raise HRKDError(f"{path} holds no relational state ({GRAPH_META}, {GRAPH_FILE}): distill an HRKD-method student first")
    meta = read_json(path / GRAPH_META)
    with torch.random.fork_rng(devices=[]):
        student = MultiDomainBert.from_pretrained(path, num_labels=1, domains=None)  # head unused
        graph = HierarchicalRelational(**_graph_ctor(meta["graph"]))
    graph.load_state_dict(torch.load(path / GRAPH_FILE, map_location="cpu", weights_only=True))
    proj = None
    if meta["graph"].get("prototype_features") == "projected":
        width = int(meta["graph"]["feature_dim"])
        proj = nn.ModuleList(nn.Linear(student.hidden_size, width) for _ in range(student.num_layers + 1))
        proj.load_state_dict(torch.load(path / PROJ_FILE, map_location="cpu", weights_only=True))
        proj.eval()
    return _RelationalProbe(student.eval(), graph.eval(), bool(meta["prototype_padding"]), meta.get("domains"), proj)


def relational_ratios(objective_or_saved_dir: KDObjective | str | Path,
                      batches_per_domain: Mapping[str, Batch] | Sequence[Batch], *,
                      graph_dropout: bool = False) -> dict[str, Any]:
    """Domain-relational ratios r [M+1, D] and hierarchical similarity ratios (Tables 5-6), dropout off.

    ``graph_dropout=True`` keeps the graph's dropout on (the authors compute r in train mode):
    comparing the two shows how much of r is dropout noise (docs/hrkd-method.md, ratio collapse).

    ``batches_per_domain``: one batch of examples per domain, in the graph's domain order (a
    mapping is read in insertion order, or in the saved domain order when its keys are those
    names). Rows are padded to a common width and averaged as in training (eq. 6).
    Returns tensors on the CPU: ``ratios`` [M+1, D], ``similarity`` (list of M+1 [D, m+1]),
    ``domain_attention`` [M+1, D, D], plus ``diagnostics`` (:func:`ratio_diagnostics`) and ``domains``.
    """
    if isinstance(objective_or_saved_dir, KDObjective):
        obj = objective_or_saved_dir
        if obj.graph is None:
            raise HRKDError(f"method '{obj.method}' has no relational graph; pass an HRKD-method objective")
        projected = obj.graph_args is not None and obj.graph_args.get("prototype_features") == "projected"
        probe = _RelationalProbe(obj.student, obj.graph, obj.prototype_padding, getattr(obj.student, "domains", None),
                                 obj.proj if projected else None)
    else:
        probe = load_relational(objective_or_saved_dir)
    domains = probe.domains
    if isinstance(batches_per_domain, Mapping):
        names = list(batches_per_domain)
        if domains is not None and sorted(names) == sorted(domains):
            names = list(domains)
        batches = [batches_per_domain[n] for n in names]
        domains = names
    else:
        batches = list(batches_per_domain)
    if len(batches) != probe.graph.num_domains:
        raise HRKDError(f"got batches for {len(batches)} domains but the graph has {probe.graph.num_domains}; pass one per domain")
    device = next(probe.student.parameters()).device
    if probe.proj is not None:
        probe.proj.to(device)
    db = concat_domain_batches([b.to(device) for b in batches])
    modes = (probe.student.training, probe.graph.training)
    probe.student.eval()
    probe.graph.train(graph_dropout)
    try:
        with torch.no_grad():
            b = db.batch
            out = probe.student(b.input_ids, b.attention_mask, b.token_type_ids,
                                domain=0 if len(probe.student.heads) > 1 else None, taps=_taps(True, ()))
            protos = domain_prototypes(out, db, probe.prototype_padding, probe.proj)
            with torch.autocast(device.type, enabled=False):
                rel = probe.graph(protos)
    finally:
        probe.student.train(modes[0])
        probe.graph.train(modes[1])
    ratios = rel.ratios.float().cpu()
    return {
        "domains": domains,
        "ratios": ratios,
        "similarity": [s.float().cpu() for s in rel.similarity],
        "domain_attention": rel.domain_attention.float().cpu(),
        "diagnostics": ratio_diagnostics(ratios),
    }

