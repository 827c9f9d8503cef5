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

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
from torch import Tensor, nn

from hrkd.config import Distill
from hrkd.distill.batches import DistillBatch, _padded
from hrkd.distill.ratios import _graph_ctor, _taps, domain_prototypes, graph_arguments
from hrkd.distill.teacher_cache import TeacherCache, TeacherView
from hrkd.distill.teacher_models import TeacherGroup
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
from hrkd.registry import METHODS
from hrkd.relational import ONE_HOT_ENTROPY, UNIFORM_SPREAD, HierarchicalRelational, layer_regimes, ratio_regime

log = logging.getLogger("hrkd.distill")


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
        teacher_autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    ) -> None:
        super().__init__()
        if method not in METHODS or METHODS[method].metakd:
            raise HRKDError(f"unknown distillation method '{method}': choose one of {[m for m, v in METHODS.items() if not v.metakd]}")
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
        if METHODS[method].graph:
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
        # The autocast of the teachers' forwards (Runtime.teacher_autocast); default: the step's.
        self.teacher_autocast = teacher_autocast
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
        with torch.inference_mode(), self.teacher_autocast():
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
