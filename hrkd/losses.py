"""Distillation losses of HRKD section 2.1 (eqs. 1-5) and the re-weighted total (eq. 17).

Every function here is pure: tensors in, a scalar tensor out, inputs never modified, no
module state. Which student layer meets which teacher layer is :func:`uniform_layer_map`.
See docs/hrkd-method.md for the equation-to-code map and the fidelity notes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hrkd.errors import HRKDError

__all__ = [
    "attention_loss",
    "embedding_loss",
    "hidden_loss",
    "layer_losses",
    "masked_attention_scores",
    "mse",
    "robust_ratio_loss",
    "soft_cross_entropy",
    "total_kd_loss",
    "uniform_layer_map",
]


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error averaged over every element (the MSE of eqs. 1, 3 and 4)."""
    _check_same_shape(a, b, "mse")
    return (a - b).pow(2).mean()


def _projected_mse(student: Tensor, teacher: Tensor, proj_weight: Tensor, proj_bias: Tensor | None) -> Tensor:
    # proj_weight is stored nn.Linear-style [Ht, Hs], so F.linear computes X W^T + b, which is
    # the paper's X W with W = proj_weight^T of shape [Hs, Ht].
    if proj_weight.shape != (teacher.shape[-1], student.shape[-1]):
        raise ValueError(
            f"projection weight must be [teacher_dim, student_dim] = "
            f"[{teacher.shape[-1]}, {student.shape[-1]}], got {tuple(proj_weight.shape)}"
        )
    return mse(F.linear(student, proj_weight, proj_bias), teacher)


def embedding_loss(
    student_emb: Tensor, teacher_emb: Tensor, proj_weight: Tensor, proj_bias: Tensor | None = None
) -> Tensor:
    """Eq. 1: L_embd = MSE(E^S W^embd, E^T).

    student_emb [B, L, Hs], teacher_emb [B, L, Ht]; proj_weight [Ht, Hs] (nn.Linear layout,
    i.e. W^embd transposed), proj_bias [Ht] or None. The authors' code uses an nn.Linear with
    bias; the paper writes a bare matrix, so the bias is optional.
    """
    return _projected_mse(student_emb, teacher_emb, proj_weight, proj_bias)


def hidden_loss(
    student_hidden: Tensor, teacher_hidden: Tensor, proj_weight: Tensor, proj_bias: Tensor | None = None
) -> Tensor:
    """Eq. 4: L_hidn^m = MSE(H_m^S W_m^hidn, H_n^T) for student layer m and its teacher layer n.

    Same shapes and projection layout as :func:`embedding_loss`, with layer m's own W_m^hidn.
    """
    return _projected_mse(student_hidden, teacher_hidden, proj_weight, proj_bias)


def attention_loss(
    student_scores: Tensor,
    teacher_scores: Tensor,
    attention_mask: Tensor,
    *,
    mask_queries: bool = False,
) -> Tensor:
    """Eq. 3: L_attn^m = (1/h) sum_i MSE(A_i^S, A_i^T) over pre-softmax attention scores.

    Scores are [B, h, L, L] raw scaled Q K^T with no mask added; attention_mask [B, L] has
    0 at padded tokens. Padded key columns are zeroed in both tensors before the MSE, which
    is what the authors' (and TinyBERT's) code ends up with: they add -10000 at padded keys
    and then replace every entry <= -100 by 0. ``mask_queries=True`` also zeroes padded
    query rows, which the authors do not do.

    Zeroed entries still count in the mean's denominator, as in the authors' code. Because
    every head has the same number of entries, (1/h) sum_i MSE_i equals the mean over all
    B*h*L*L entries, which is how it is computed.
    """
    return mse(*masked_attention_scores(student_scores, teacher_scores, attention_mask, mask_queries=mask_queries))


def masked_attention_scores(
    student_scores: Tensor, teacher_scores: Tensor, attention_mask: Tensor, *, mask_queries: bool = False
) -> tuple[Tensor, Tensor]:
    """Both [B, h, L, L] score tensors with padded key columns (and, with ``mask_queries``, padded
    query rows) set to 0: the masking rule of eq. 3 here and of Meta-KD's per-example loss."""
    _check_same_shape(student_scores, teacher_scores, "attention_loss")
    if student_scores.dim() != 4:
        raise ValueError(f"attention scores must be [B, h, L, L], got {tuple(student_scores.shape)}")
    batch, _, queries, keys = student_scores.shape
    if attention_mask.shape != (batch, keys) or queries != keys:
        raise ValueError(
            f"attention_mask must be [B, L] = [{batch}, {keys}] for scores {tuple(student_scores.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    real = attention_mask.to(torch.bool)
    keep = real[:, None, None, :]
    if mask_queries:
        keep = keep & real[:, None, :, None]
    zero = student_scores.new_zeros(())
    return torch.where(keep, student_scores, zero), torch.where(keep, teacher_scores, zero)


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    class_mean: bool = False,
) -> Tensor:
    """Eq. 2: L_pred = CE(z^S / t, z^T / t), the soft cross-entropy against teacher probabilities.

    Returns mean over the batch of -sum_c softmax(z^T/t)_c log softmax(z^S/t)_c for logits
    [B, C]. ``class_mean=True`` reproduces the authors' utils/losses.py, which takes the mean
    over classes too, i.e. the paper's value divided by C.
    """
    _check_same_shape(student_logits, teacher_logits, "soft_cross_entropy")
    if temperature <= 0:
        raise HRKDError(f"temperature must be > 0, got {temperature}; set a positive distillation temperature")
    terms = -F.softmax(teacher_logits / temperature, dim=-1) * F.log_softmax(student_logits / temperature, dim=-1)
    if class_mean:
        return terms.mean()
    return terms.sum(dim=-1).mean()


def total_kd_loss(
    embd: Tensor,
    attn: Tensor,
    hidn: Tensor,
    pred: Tensor,
    gamma: float,
    ratios: Tensor | None = None,
) -> Tensor:
    """Combine per-domain losses: eq. 5 without ratios, eq. 17 with them.

    embd [D] and pred [D] hold L_embd^d and L_pred^d; attn [M, D] and hidn [M, D] hold
    L_attn^{m,d} and L_hidn^{m,d} for student layers m = 1..M (row m-1).

    - ratios None (eq. 5): sum_d (L_embd^d + sum_m (L_attn^{m,d} + L_hidn^{m,d}) + gamma L_pred^d).
    - ratios [M+1, D] (eq. 17): sum_d (r_{0,d} L_embd^d + sum_m r_{m,d} (L_attn^{m,d} + L_hidn^{m,d})
      + (gamma / D) L_pred^d); row 0 weights the embedding layer.

    Ratios are used as given: whether gradients flow through them into the student (the
    authors' code does not detach them) is the caller's decision.
    """
    if embd.dim() != 1 or pred.shape != embd.shape:
        raise ValueError(f"embd and pred must both be [D], got {tuple(embd.shape)} and {tuple(pred.shape)}")
    domains = embd.shape[0]
    if attn.dim() != 2 or attn.shape[1] != domains or hidn.shape != attn.shape:
        raise ValueError(
            f"attn and hidn must both be [M, {domains}], got {tuple(attn.shape)} and {tuple(hidn.shape)}"
        )
    layer_terms = attn + hidn
    if ratios is None:
        return embd.sum() + layer_terms.sum() + gamma * pred.sum()
    if ratios.shape != (attn.shape[0] + 1, domains):
        raise ValueError(f"ratios must be [M+1, D] = [{attn.shape[0] + 1}, {domains}], got {tuple(ratios.shape)}")
    return (ratios[0] * embd).sum() + (ratios[1:] * layer_terms).sum() + (gamma / domains) * pred.sum()


def layer_losses(embd: Tensor, attn: Tensor, hidn: Tensor) -> Tensor:
    """The [M+1, D] matrix that eq. 17's ratios weight: row 0 L_embd^d, row m L_attn^{m,d} + L_hidn^{m,d}."""
    return torch.cat([embd.unsqueeze(0), attn + hidn])


def robust_ratio_loss(ratios: Tensor, losses: Tensor, tau: float) -> Tensor:
    """The graph's loss under ``distill.ratios: dro`` (to minimise; the student's losses held constant).

    Maximises sum_m [ sum_d r_{m,d} Lrel_{m,d} - tau KL(r_m || uniform) ], with the relative
    losses Lrel_{m,d} = L_{m,d} / mean_d L_{m,d} (layers differ in scale by 100x; a relative
    loss makes tau mean the same on every row). For each row the maximiser over the simplex is
    r_m = softmax(Lrel_m / tau): the KL-regularised form of Group DRO (Sagawa et al., ICLR 2020),
    which up-weights the domains the student distils worst, never one-hot for tau > 0 and
    uniform only when the domains' losses are equal. ``losses`` should be detached.
    """
    if ratios.shape != losses.shape or ratios.dim() != 2:
        raise ValueError(f"ratios and losses must both be [M+1, D], got {tuple(ratios.shape)} and {tuple(losses.shape)}")
    if tau <= 0:
        raise HRKDError(f"dro_tau must be > 0, got {tau}; set distill.dro_tau to a positive number")
    domains = ratios.shape[1]
    relative = losses / losses.mean(dim=1, keepdim=True).clamp_min(torch.finfo(losses.dtype).tiny)
    kl = (torch.special.xlogy(ratios, ratios) + ratios * math.log(domains)).sum()
    return -((ratios * relative).sum() - tau * kl)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's "uniform" strategy: student layer m (1..M) learns from teacher layer m * (N // M).

    Returns the 1-based teacher layer for each student layer 1..M (teacher layer 0 would be
    the embeddings, which eq. 1 already pairs). When N is not a multiple of M the interval is
    floored, exactly as TinyBERT and the authors' code do (``teacher_interval = N // M``), so
    the top teacher layers go unused: M=5, N=12 gives [2, 4, 6, 8, 10].
    """
    if student_layers < 1 or teacher_layers < student_layers:
        raise HRKDError(
            f"uniform layer mapping needs 1 <= student layers <= teacher layers, got "
            f"student={student_layers}, teacher={teacher_layers}; use a shallower student"
        )
    interval = teacher_layers // student_layers
    return [m * interval for m in range(1, student_layers + 1)]
