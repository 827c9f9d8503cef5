"""The frozen teachers of a distillation run: which checkpoint serves each domain, loaded once.

Teachers are deliberately *not* submodules of the objective: the optimiser, the resume state,
the best-checkpoint snapshots and DDP never see them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from hrkd.engine import SHARED
from hrkd.errors import HRKDError
from hrkd.models import MultiDomainBert

log = logging.getLogger("hrkd.distill")


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
        paths = {d: teacher_dir / SHARED / d for d in domains}
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

