"""Loss functions of Meta-KD (Pan et al., ACL 2021), all pure: tensors in, tensors out.

Meta-KD weights every *example*: the teacher loss by the transferability score t_i, the
intermediate-layer distillation loss by the domain-expertise weight lambda_i. Those weights only
mean something if each example keeps its own loss until it is weighted, so the KD terms here come
in per-example form ([B] tensors; "MSE" = mean over every non-batch dimension), reduced only by
:func:`weighted_mean`. Reducing first (EasyNLP's port) turns lambda_i into mean(lambda) times the
batch loss, i.e. no per-example weighting at all (docs/metakd.md, ambiguity 6).

Spec references ("1b", "1c") are to /work/shared/papers/meta-kd-spec.md, summarised in docs/metakd.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hrkd.errors import HRKDError
from hrkd.losses import masked_attention_scores

__all__ = [
    "expertise_weights",
    "masked_positions_mean",
    "meta_teacher_loss",
    "per_example_attention_mse",
    "per_example_mse",
    "per_example_soft_ce",
    "weighted_mean",
]


def _check_batch(what: str, *tensors: Tensor) -> int:
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"{what}: batch sizes differ, {[tuple(t.shape) for t in tensors]}")
    return sizes.pop()


def masked_positions_mean(hidden: Tensor, attention_mask: Tensor | None = None, *, skip_first: bool = True) -> Tensor:
    """Mean of ``hidden`` [B, L, H] over positions 1..L-1 (position 0, [CLS], dropped) -> [B, H].

    ``attention_mask`` None averages every position of the given width, padding included (the
    authors' E(x) and h-bar); a [B, L] mask averages real tokens only. ``skip_first=False`` keeps
    position 0.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be [B, L, H], got {tuple(hidden.shape)}")
    start = 1 if skip_first else 0
    if hidden.shape[1] <= start:
        raise ValueError(f"need at least {start + 1} positions to average, got width {hidden.shape[1]}")
    h = hidden[:, start:]
    if attention_mask is None:
        return h.mean(dim=1)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask must be [B, L] = {tuple(hidden.shape[:2])}, got {tuple(attention_mask.shape)}")
    m = attention_mask[:, start:].to(h.dtype).unsqueeze(-1)
    # clamp: a row that is only [CLS] has nothing to average; it gets 0 rather than NaN.
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def meta_teacher_loss(
    logits: Tensor,
    labels: Tensor,
    domain_logits: Tensor | None,
    corrupted_domains: Tensor | None,
    weights: Tensor,
    domain_loss_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Meta-teacher loss (spec 1b, the authors' code): mean_i t_i * (CE_i + gamma1 * L_DA,i).

    logits [B, C], labels [B]; domain_logits [B, K] and corrupted_domains [B] (the batch's domain
    ids, randomly permuted: L_DA,i = CE(q_i, z~_i)), or both None when gamma1 = 0; weights [B]
    are the t_i (ones to switch the weighting off). t_i scales the domain term too, as in the code.
    Returns (loss, mean CE, mean L_DA) - the last two unweighted, for logging.
    """
    _check_batch("meta_teacher_loss", logits, labels, weights)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    per_example = ce
    da = ce.new_zeros(())
    if domain_loss_weight:
        if domain_logits is None or corrupted_domains is None:
            raise ValueError("domain_logits and corrupted_domains are needed when domain_loss_weight > 0")
        _check_batch("meta_teacher_loss", logits, domain_logits, corrupted_domains)
        da_i = F.cross_entropy(domain_logits.float(), corrupted_domains, reduction="none")
        per_example = ce + domain_loss_weight * da_i
        da = da_i.mean()
    return weighted_mean(per_example, weights), ce.mean(), da


def expertise_weights(teacher_logits: Tensor, labels: Tensor, transferability: Tensor) -> Tensor:
    """Domain-expertise weights lambda_i = (1 + t_i) / (1 + exp((1 - p_i)^2)), p_i = softmax(z^T_i)[y_i].

    teacher_logits [B, C] (temperature 1, as in the code), labels [B] (gold), transferability [B].
    Lies in [(1 + t)/(1 + e), (1 + t)/2]: examples the teacher gets right, and transferable ones,
    count more. Returned as constants (no gradient): they weight the student's loss.
    """
    _check_batch("expertise_weights", teacher_logits, labels, transferability)
    with torch.no_grad():
        p = F.softmax(teacher_logits.float(), dim=-1).gather(1, labels.view(-1, 1)).squeeze(1)
        return (1.0 + transferability.float()) / (1.0 + torch.exp((1.0 - p) ** 2))


def per_example_mse(a: Tensor, b: Tensor) -> Tensor:
    """[B] mean squared error of each example over all its other dimensions."""
    if a.shape != b.shape:
        raise ValueError(f"per_example_mse: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def per_example_attention_mse(
    student_scores: Tensor, teacher_scores: Tensor, attention_mask: Tensor, *, mask_queries: bool = False
) -> Tensor:
    """[B] attention loss of each example: :func:`hrkd.losses.attention_loss` before its batch mean.

    Pre-softmax scores [B, h, L, L] without the mask added; padded key columns are zeroed in both
    (the code's "entries <= -100 -> 0" after adding -10000 at padded keys) and still count in the
    mean over heads x L x L. ``mask_queries`` also zeroes padded query rows (not the authors').
    """
    return per_example_mse(*masked_attention_scores(student_scores, teacher_scores, attention_mask,
                                                    mask_queries=mask_queries))


def per_example_soft_ce(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, *,
                        class_mean: bool = False) -> Tensor:
    """[B] soft cross-entropy -sum_c softmax(z^T/T)_c log softmax(z^S/T)_c of each example.

    ``class_mean=True`` divides by the class count (the original code's mean over classes).
    Its batch mean is :func:`hrkd.losses.soft_cross_entropy`.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"logits must both be [B, C]: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise HRKDError(f"temperature must be > 0, got {temperature}; set metakd.distill.temperature positive")
    terms = -F.softmax(teacher_logits.float() / temperature, dim=-1) * F.log_softmax(
        student_logits.float() / temperature, dim=-1)
    return terms.mean(dim=-1) if class_mean else terms.sum(dim=-1)


def weighted_mean(per_example: Tensor, weights: Tensor) -> Tensor:
    """mean_i w_i * L_i = sum_i w_i L_i / B: each example weighted by its own w_i.

    Not mean(w) * mean(L) (EasyNLP's reduction), which differs whenever w and L co-vary.
    """
    if per_example.dim() != 1 or per_example.shape != weights.shape:
        raise ValueError(f"per-example losses and weights must both be [B], got {tuple(per_example.shape)} and "
                         f"{tuple(weights.shape)}")
    return (weights.to(per_example.dtype) * per_example).mean()
