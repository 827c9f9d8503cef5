"""A shared BERT encoder with one classification head per domain, and distillation taps.

HRKD (section 2.1) shares the embedding and transformer layers across domains and gives each
domain its own prediction layer; teachers and students are both this module. The encoder is an
unmodified ``transformers`` model (any BERT-family ``AutoModel`` with a pooler), so weights load
from and save to ordinary checkpoints; only its attention function is swapped for the tapping
one in :mod:`hrkd.models.attention`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from hrkd.errors import HRKDError
from hrkd.models.attention import SCORES_KWARG, TAP_LAYERS_KWARG, ensure_registered

log = logging.getLogger(__name__)

METADATA_FILE = "hrkd.json"


@dataclass(frozen=True)
class Taps:
    """What a forward should expose besides logits.

    ``hidden``: the embedding-layer output and every transformer layer's output.
    ``attention_layers``: 1-based layer indices whose pre-softmax attention scores are returned;
    all other layers keep the fused SDPA kernel and never build an ``L x L`` map.
    """

    hidden: bool = False
    attention_layers: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def all(cls, num_layers: int) -> "Taps":
        """Every tap a TinyBERT/HRKD loss can use, for a model with ``num_layers`` layers."""
        return cls(hidden=True, attention_layers=frozenset(range(1, num_layers + 1)))


NO_TAPS = Taps()


@dataclass
class EncoderOutput:
    """Result of :meth:`MultiDomainBert.forward`.

    ``attention_scores[m]`` is the raw ``Q K^T / sqrt(d)`` of layer ``m`` ([B, heads, L, L])
    WITHOUT the padding mask added: padded key positions are those where the ``attention_mask``
    the caller passed is 0, and losses must zero (or drop) them with that mask themselves.
    """

    logits: torch.Tensor  # [B, C]
    pooled: torch.Tensor  # [B, H], pooler output before the classifier dropout
    last_hidden: torch.Tensor  # [B, L, H]
    embeddings: torch.Tensor | None = None  # [B, L, H], embedding-layer output (hidden_states[0] in HF)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # outputs of layers 1..N, each [B, L, H]
    attention_scores: dict[int, torch.Tensor] | None = None  # 1-based layer -> [B, heads, L, L]


class MultiDomainBert(nn.Module):
    """Shared BERT-family encoder + a linear head per domain (or one head when ``domains=None``).

    The head path (pooler -> dropout -> linear) is exactly ``BertForSequenceClassification``'s, so
    each head plus the encoder exports as a plain classifier (:mod:`hrkd.models.checkpoint`).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_labels: int,
        domains: Sequence[str] | None = None,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_labels, int) or num_labels < 1:
            raise HRKDError(f"num_labels must be a positive integer (got {num_labels!r}): pass the task's label count")
        if domains is not None:
            domains = list(domains)
            if not domains or len(set(domains)) != len(domains):
                raise HRKDError(f"domains must be a non-empty list of distinct names (got {domains}); fix the domain list")
        if getattr(encoder, "pooler", None) is None:
            raise HRKDError(
                f"{type(encoder).__name__} has no pooler: use a BERT-family checkpoint loaded with its pooling layer"
            )
        config = encoder.config
        if dropout is not None:
            # Stored in the config so an exported classifier uses the same dropout when fine-tuned.
            config.classifier_dropout = float(dropout)
        p = getattr(config, "classifier_dropout", None)
        p = config.hidden_dropout_prob if p is None else p
        use_taps(encoder)
        self.encoder = encoder
        self.domains: list[str] | None = domains
        self.num_labels = num_labels
        self.dropout = nn.Dropout(p)
        self.heads = nn.ModuleList(
            nn.Linear(config.hidden_size, num_labels) for _ in range(len(domains) if domains else 1)
        )
        std = getattr(config, "initializer_range", 0.02)
        for head in self.heads:  # BERT's classifier init; draws from torch's global RNG
            nn.init.normal_(head.weight, mean=0.0, std=std)
            nn.init.zeros_(head.bias)
        self.metadata: dict = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        num_labels: int,
        domains: Sequence[str] | None,
        revision: str | None = None,
        dropout: float | None = None,
    ) -> "MultiDomainBert":
        """Encoder weights from a BERT-family checkpoint (local dir or hub id); heads freshly initialised.

        ``dropout`` overrides the dropout before the heads (default: the config's
        ``classifier_dropout``, else ``hidden_dropout_prob``, as in ``BertForSequenceClassification``).
        """
        from hrkd.models.pretrained import load_encoder

        if not isinstance(num_labels, int) or num_labels < 1:  # fail before loading gigabytes
            raise HRKDError(f"num_labels must be a positive integer (got {num_labels!r}): pass the task's label count")
        encoder = load_encoder(str(path_or_hub_id), revision=revision)
        # Returned in eval mode, like transformers' from_pretrained; trainers call .train().
        return cls(encoder, num_labels=num_labels, domains=domains, dropout=dropout).eval()

    @classmethod
    def from_classifier(cls, path: str | Path, num_labels: int | None = None) -> "MultiDomainBert":
        """A saved ``*ForSequenceClassification`` directory as a single-head model (encoder + classifier)."""
        from transformers import AutoModelForSequenceClassification

        from hrkd.io import read_json

        path = Path(path)
        if not (path / "config.json").is_file():
            raise HRKDError(f"{path} is not a saved classifier (no config.json): train it first or fix the path")
        try:
            clf = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=ensure_registered())
        except (OSError, ValueError) as err:
            raise HRKDError(f"could not load the classifier in {path} ({_first_line(err)}): re-create it") from None
        head = getattr(clf, "classifier", None)
        if not isinstance(head, nn.Linear):
            raise HRKDError(f"{path}: {type(clf).__name__} has no single linear classifier; use a BERT classifier")
        labels = clf.config.num_labels
        if num_labels is not None and labels != num_labels:
            raise HRKDError(f"{path} predicts {labels} labels but {num_labels} are needed: load the right task's model")
        encoder = clf.base_model
        model = cls(encoder, num_labels=labels, domains=None, dropout=clf.dropout.p)
        model.heads[0].load_state_dict(head.state_dict())
        meta_path = path / METADATA_FILE
        model.metadata = read_json(meta_path) if meta_path.is_file() else {}
        return model.eval()

    # ------------------------------------------------------------------ properties
    @property
    def config(self):
        return self.encoder.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_attention_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def domain_index(self, domain: str | int) -> int:
        """Head index of a domain name (or a validated index)."""
        n = len(self.heads)
        if isinstance(domain, str):
            if self.domains is None or domain not in self.domains:
                known = self.domains if self.domains is not None else "none (single-head model)"
                raise HRKDError(f"unknown domain '{domain}': this model has heads for {known}; pass one of them")
            return self.domains.index(domain)
        if not 0 <= int(domain) < n:
            raise HRKDError(f"domain index {int(domain)} is out of range: this model has {n} head(s) (0..{n - 1})")
        return int(domain)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        domain: int | str | torch.Tensor | None = None,
        taps: Taps | None = None,
    ) -> EncoderOutput:
        """Encode a batch and classify each row with its domain's head.

        ``domain``: None (single-head model), an int or name (every row uses that head), or a
        LongTensor [B] of per-row head indices, so one batch can mix domains.
        """
        taps = taps or NO_TAPS
        tap_layers = self._tap_layers(taps.attention_layers)
        extra: dict = {}
        scores: dict[int, torch.Tensor] = {}
        if tap_layers:
            extra = {TAP_LAYERS_KWARG: tap_layers, SCORES_KWARG: scores}
        if token_type_ids is not None:
            extra["token_type_ids"] = token_type_ids
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=taps.hidden,
            return_dict=True,
            **extra,
        )
        pooled = out.pooler_output
        logits = self._classify(self.dropout(pooled), domain)
        embeddings = hidden = None
        if taps.hidden:
            embeddings, hidden = out.hidden_states[0], tuple(out.hidden_states[1:])
        return EncoderOutput(
            logits=logits,
            pooled=pooled,
            last_hidden=out.last_hidden_state,
            embeddings=embeddings,
            hidden_states=hidden,
            attention_scores=dict(sorted(scores.items())) if tap_layers else None,
        )

    def _tap_layers(self, layers: frozenset[int]) -> frozenset[int]:
        """1-based user indices -> the 0-based ``layer_idx`` the attention modules carry."""
        bad = sorted(m for m in layers if not isinstance(m, int) or not 1 <= m <= self.num_layers)
        if bad:
            raise HRKDError(f"attention taps {bad} are not layers of this {self.num_layers}-layer model: use 1..{self.num_layers}")
        return frozenset(m - 1 for m in layers)

    def _classify(self, x: torch.Tensor, domain: int | str | torch.Tensor | None) -> torch.Tensor:
        if domain is None:
            if len(self.heads) != 1:
                raise HRKDError(f"this model has {len(self.heads)} domain heads {self.domains}: pass domain=")
            return self.heads[0](x)
        if isinstance(domain, torch.Tensor) and domain.dim() == 0:
            domain = int(domain)
        if not isinstance(domain, torch.Tensor):
            return self.heads[self.domain_index(domain)](x)
        if domain.shape != x.shape[:1] or domain.dtype not in (torch.int64, torch.int32):
            raise HRKDError(f"domain ids must be an integer tensor of shape [{x.shape[0]}] (got {domain.dtype} {tuple(domain.shape)})")
        # The range check syncs with the GPU; indexing would catch a bad id anyway, so only pay for
        # the friendly message where it is free (CPU tensors).
        if domain.device.type == "cpu" and bool(((domain < 0) | (domain >= len(self.heads))).any()):
            raise HRKDError(f"domain ids must lie in 0..{len(self.heads) - 1} (this model's heads); fix the batch's domain ids")
        # One batched matmul over per-row head weights instead of a Python loop over rows/domains.
        weight = torch.stack([h.weight for h in self.heads])[domain]  # [B, C, H]
        bias = torch.stack([h.bias for h in self.heads])[domain]  # [B, C]
        return torch.bmm(weight, x.unsqueeze(-1)).squeeze(-1) + bias


def use_taps(encoder: nn.Module) -> None:
    """Switch a ``transformers`` encoder to the tapping attention (plain SDPA unless tapped)."""
    name = ensure_registered()
    if encoder.config._attn_implementation == name:
        return
    encoder.set_attn_implementation(name)
    if encoder.config._attn_implementation != name:
        raise HRKDError(
            f"{type(encoder).__name__} does not use transformers' AttentionInterface, so attention taps cannot be "
            "attached; use a BERT-family model from transformers >= 5"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
