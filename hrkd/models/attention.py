"""Attention that exposes pre-softmax scores only for the layers a distillation loss asks for.

TinyBERT-style attention distillation (HRKD eq. 3) needs the raw scores ``QK^T / sqrt(d)`` of a
few layers, but asking ``transformers`` for ``output_attentions`` forces the eager kernel in
*every* layer and materialises all ``L x L`` maps. Instead we register one attention function with
``transformers``' ``AttentionInterface`` that decides per layer: the layers named in the forward's
``hrkd_tap_layers`` keyword run plain eager math and drop their scores into the ``hrkd_scores``
dict passed alongside; every other layer calls the stock SDPA integration unchanged, so a forward
without taps costs exactly what plain inference costs.

Both keywords travel through the model's ``**kwargs`` down to the attention call (that is how
``transformers`` 5 threads per-call options), so no state lives on the module and concurrent
forwards cannot see each other's taps.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

ATTN_IMPLEMENTATION = "hrkd_taps"
TAP_LAYERS_KWARG = "hrkd_tap_layers"  # frozenset of 0-based layer indices (module.layer_idx)
SCORES_KWARG = "hrkd_scores"  # dict filled with {1-based layer: scores [B, heads, Lq, Lk]}

_lock = threading.Lock()
_registered = False


def ensure_registered() -> str:
    """Register the tapping attention (and its mask builder) with ``transformers``; idempotent.

    Called lazily by the models that use it, never at import, so importing ``hrkd`` leaves the
    global ``transformers`` registries untouched.
    """
    global _registered
    if _registered:
        return ATTN_IMPLEMENTATION
    with _lock:
        if not _registered:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            AttentionInterface.register(ATTN_IMPLEMENTATION, tapped_attention_forward)
            # Without a registered mask builder transformers treats a custom implementation as
            # mask-free and silently drops padding; the SDPA builder yields the boolean mask (or
            # None when nothing is padded) that the stock SDPA path receives.
            AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
            _registered = True
    return ATTN_IMPLEMENTATION


def tapped_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``AttentionInterface`` entry: eager with captured scores for tapped layers, SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tap_layers: frozenset[int] | None = kwargs.pop(TAP_LAYERS_KWARG, None)
    sink: dict[int, torch.Tensor] | None = kwargs.pop(SCORES_KWARG, None)
    layer_idx = getattr(module, "layer_idx", None)
    if not tap_layers or sink is None or layer_idx not in tap_layers:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    output, probs, scores = eager_attention_with_scores(module, query, key, value, attention_mask, dropout, scaling)
    sink[layer_idx + 1] = scores
    return output, probs


def eager_attention_with_scores(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (output [B, Lq, heads, d], probabilities, raw scores), the scores WITHOUT the mask.

    Scores are kept unmasked so a loss sees the teacher's and student's actual values at every
    position and zeroes padded keys itself from the caller's 2-D ``attention_mask``; adding the
    mask here would put ``finfo.min`` into an MSE.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention in BERT-like variants: expand K/V to all heads
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    masked = scores
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # SDPA convention: True = may attend
            masked = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:  # an additive float mask a caller prepared
            masked = scores + attention_mask
    probs = torch.softmax(masked, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs, scores
