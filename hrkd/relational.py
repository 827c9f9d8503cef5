"""Domain-relational ratios of HRKD sections 2.2-2.3 (eqs. 6-16).

Per-layer, per-domain prototypes (eq. 6) go through reference prototypes (eqs. 13-14), the
hierarchical compare-aggregate (eqs. 15-16) and one two-layer graph attention network per
student layer (eqs. 7-12), giving ratios r [M+1, D] that re-weight the KD losses (eq. 17).
See docs/hrkd-method.md for defaults, fidelity notes and the ratio-collapse diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hrkd.errors import HRKDError

__all__ = [
    "CompareAggregate",
    "DomainGraph",
    "GraphAttentionLayer",
    "HierarchicalRelational",
    "ReferencePrototypes",
    "RelationalOutput",
    "layer_prototypes",
    "ratio_diagnostics",
    "stack_domain_prototypes",
]

# GAT (Velickovic et al.) and the authors' models/gnn.py initialise every graph and
# attention matrix with xavier_uniform(gain=1.414); LeakyReLU slope 0.2 is theirs too.
XAVIER_GAIN = 1.414
NEGATIVE_SLOPE = 0.2


def _xavier_uniform_(tensor: Tensor, fan_in: int, fan_out: int, gain: float = XAVIER_GAIN) -> None:
    # Fans are passed explicitly because per-head weights live in one stacked tensor whose
    # shape would make torch's fan computation count the head axis as a receptive field.
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        tensor.uniform_(-bound, bound)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise HRKDError(f"{name} must be >= 1, got {value}")


# --------------------------------------------------------------------------- eq. 6


def layer_prototypes(
    embeddings: Tensor,
    hidden_states: Sequence[Tensor],
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Eq. 6 for one domain's batch: h_{m,d} = token- and example-average of layer m's output.

    embeddings [B, L, F] is layer m = 0; hidden_states holds the M transformer outputs
    [B, L, F]. Returns [M+1, F].

    attention_mask None averages over all B*L positions, padding included: the paper's
    1/(|D_d| L) and the authors' ``.mean(2).mean(2)``. With a mask [B, L] (0 = padding) the
    average runs over real tokens only, pooled over the batch so every real token weighs
    the same.
    """
    layers = torch.stack([embeddings, *hidden_states], dim=0)  # [M+1, B, L, F]
    if layers.dim() != 4:
        raise ValueError(f"layer outputs must be [B, L, F], got {tuple(embeddings.shape)}")
    if attention_mask is None:
        return layers.mean(dim=(1, 2))
    if attention_mask.shape != layers.shape[1:3]:
        raise ValueError(
            f"attention_mask must be [B, L] = {tuple(layers.shape[1:3])}, got {tuple(attention_mask.shape)}"
        )
    weights = attention_mask.to(layers.dtype)
    count = weights.sum()
    if count == 0:
        raise ValueError("attention_mask marks every token as padding; a prototype needs at least one real token")
    return torch.einsum("mblf,bl->mf", layers, weights) / count


def stack_domain_prototypes(per_domain: Sequence[Tensor]) -> Tensor:
    """Stack D per-domain prototypes [M+1, F] into the graphs' input [M+1, D, F]."""
    if len(per_domain) == 0:
        raise ValueError("need the prototypes of at least one domain")
    return torch.stack(list(per_domain), dim=1)


# --------------------------------------------------------------------------- eqs. 7-12


class GraphAttentionLayer(nn.Module):
    """One multi-head GAT layer over a complete graph with self-loops (eqs. 7-9 / 11-12).

    Per head k: s_ij = a_k^T [W_k h_i (+) W_k h_j], alpha_ij = softmax_j(LeakyReLU(s_ij)) over all
    nodes, out_i = ELU(sum_j alpha_ij W_k h_j [+ W_self,k h_i when skip]); heads concatenated.
    Dropout hits the input features and the attention coefficients, as in GAT and the
    authors' code.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        heads: int,
        *,
        dropout: float = 0.1,
        negative_slope: float = NEGATIVE_SLOPE,
        skip: bool = False,
        activation: bool = True,
    ) -> None:
        super().__init__()
        _positive("graph input size", in_features)
        _positive("graph hidden size", out_features)
        _positive("graph heads", heads)
        self.heads = heads
        self.out_features = out_features
        self.dropout = dropout
        self.negative_slope = negative_slope
        self.activation = activation  # False: return the pre-ELU sum (a linear output layer)
        self.weight = nn.Parameter(torch.empty(heads, in_features, out_features))
        self.attention = nn.Parameter(torch.empty(heads, 2 * out_features))
        # The "root" term gives each node a contribution of its own that the shared
        # neighbourhood average cannot cancel (see the collapse notes in the docs).
        self.self_weight = nn.Parameter(torch.empty(heads, in_features, out_features)) if skip else None
        for k in range(heads):
            _xavier_uniform_(self.weight[k], in_features, out_features)
            _xavier_uniform_(self.attention[k], 2 * out_features, 1)
            if self.self_weight is not None:
                _xavier_uniform_(self.self_weight[k], in_features, out_features)

    def coefficients(self, transformed: Tensor) -> Tensor:
        """Eqs. 7-8: attention [K, D, D] from transformed features W h of shape [K, D, F']."""
        a_query, a_key = self.attention.split(self.out_features, dim=-1)  # a = [a_query (+) a_key]
        scores = torch.einsum("kdo,ko->kd", transformed, a_query)[:, :, None] + torch.einsum(
            "kdo,ko->kd", transformed, a_key
        )[:, None, :]
        return F.softmax(F.leaky_relu(scores, self.negative_slope), dim=-1)

    def forward(self, nodes: Tensor) -> tuple[Tensor, Tensor]:
        """nodes [D, F_in] -> (outputs [D, K*F'], attention [K, D, D] before dropout)."""
        nodes = F.dropout(nodes, self.dropout, self.training)
        transformed = torch.einsum("df,kfo->kdo", nodes, self.weight)
        attention = self.coefficients(transformed)
        mixed = torch.einsum("kij,kjo->kio", F.dropout(attention, self.dropout, self.training), transformed)
        if self.self_weight is not None:
            mixed = mixed + torch.einsum("df,kfo->kdo", nodes, self.self_weight)
        out = F.elu(mixed) if self.activation else mixed  # [K, D, F']
        return out.permute(1, 0, 2).reshape(nodes.shape[0], -1), attention


class DomainGraph(nn.Module):
    """The two-layer domain-relational graph of one student layer (eqs. 7-12), r_m in R^D.

    Layer 1: K heads of W_m [F -> F'] and a_m, concatenated to K*F' (eq. 9). Layer 2: one head
    of W'_m [K*F' -> 1] and a'_m in R^2 (eqs. 10-12). r_m = softmax over domains of layer 2's
    ELU output (eq. 10). ``skip=True`` adds a separate W_self h_i inside both layers' ELU.
    ``output_elu=False`` drops layer 2's ELU, so r = softmax of its linear output: the ELU is
    bounded below by -1, and once every node's layer-2 input is far below 0 all logits are
    -1 to fp32 (r exactly 1/D) with a gradient of exp(input) ~ 0, a state training cannot leave.
    """

    def __init__(
        self,
        feature_dim: int,
        hidden_dim: int,
        heads: int = 8,
        *,
        dropout: float = 0.1,
        negative_slope: float = NEGATIVE_SLOPE,
        skip: bool = False,
        output_elu: bool = True,
    ) -> None:
        super().__init__()
        self.first = GraphAttentionLayer(
            feature_dim, hidden_dim, heads, dropout=dropout, negative_slope=negative_slope, skip=skip
        )
        self.second = GraphAttentionLayer(
            heads * hidden_dim, 1, 1, dropout=dropout, negative_slope=negative_slope, skip=skip,
            activation=output_elu,
        )
        if not output_elu:
            # A linear output starts at zero: r = 1/D exactly (the KL term's prior) with a live
            # gradient, instead of a random r whose spread is larger than the robust optimum's.
            with torch.no_grad():
                self.second.weight.zero_()
                if self.second.self_weight is not None:
                    self.second.self_weight.zero_()

    def logits(self, nodes: Tensor) -> Tensor:
        """The ELU outputs of eq. 10 before the softmax, one per domain: [D]."""
        if nodes.dim() != 2:
            raise ValueError(f"graph input must be [D, F], got {tuple(nodes.shape)}")
        hidden, _ = self.first(nodes)
        out, _ = self.second(hidden)
        return out.squeeze(-1)

    def forward(self, nodes: Tensor) -> Tensor:
        """nodes [D, F] (one prototype per domain) -> ratios r_m [D], summing to 1 (eq. 10)."""
        return F.softmax(self.logits(nodes), dim=-1)


# --------------------------------------------------------------------------- eqs. 13-16


class ReferencePrototypes(nn.Module):
    """Eqs. 13-14 for one layer: alpha^D = softmax_rows(h W^D h^T), RP = alpha^D h.

    ``self_attention=False`` is the paper's "- Self-attention" ablation: RP = h (each
    domain's own prototype) and alpha^D is the identity; no W^D is created.
    """

    def __init__(self, feature_dim: int, *, self_attention: bool = True) -> None:
        super().__init__()
        _positive("feature_dim", feature_dim)
        self.weight = nn.Parameter(torch.empty(feature_dim, feature_dim)) if self_attention else None
        if self.weight is not None:
            _xavier_uniform_(self.weight, feature_dim, feature_dim)

    def forward(self, prototypes: Tensor) -> tuple[Tensor, Tensor]:
        """prototypes h_m [D, F] -> (RP_m [D, F], alpha^D_m [D, D])."""
        if self.weight is None:
            eye = torch.eye(prototypes.shape[0], dtype=prototypes.dtype, device=prototypes.device)
            return prototypes, eye
        attention = F.softmax(prototypes @ self.weight @ prototypes.T, dim=-1)
        return attention @ prototypes, attention


class CompareAggregate(nn.Module):
    """Eqs. 15-16 for one layer m: alpha^H_{m,d} = softmax(h_{<=m,d} W^H_{m,d} RP_{m,d}), AP = alpha^H h_{<=m,d}.

    W^H has one [F, F] matrix per domain. ``comp_agg=False`` is the "- Comp-Agg" ablation:
    a plain average of layers 0..m, with no W^H.
    """

    def __init__(self, num_domains: int, feature_dim: int, *, comp_agg: bool = True) -> None:
        super().__init__()
        _positive("num_domains", num_domains)
        _positive("feature_dim", feature_dim)
        self.weight = nn.Parameter(torch.empty(num_domains, feature_dim, feature_dim)) if comp_agg else None
        if self.weight is not None:
            for d in range(num_domains):
                _xavier_uniform_(self.weight[d], feature_dim, feature_dim)

    def forward(self, history: Tensor, reference: Tensor | None) -> tuple[Tensor, Tensor]:
        """history h_{<=m} [m+1, D, F], reference RP_m [D, F] -> (AP_m [D, F], alpha^H_m [D, m+1])."""
        layers, domains, _ = history.shape
        if self.weight is None:
            uniform = history.new_full((domains, layers), 1.0 / layers)
            return history.mean(dim=0), uniform
        if reference is None:
            raise ValueError("compare-aggregate needs the reference prototypes RP_m")
        scores = torch.einsum("ldf,dfg,dg->dl", history, self.weight, reference)
        similarity = F.softmax(scores, dim=-1)
        return torch.einsum("dl,ldf->df", similarity, history), similarity


# --------------------------------------------------------------------------- full module


@dataclass(frozen=True)
class RelationalOutput:
    """What :class:`HierarchicalRelational` computes for one step.

    ratios [M+1, D]: r_{m,d} of eq. 17, rows sum to 1.
    similarity: M+1 tensors [D, m+1], the hierarchical similarity ratios alpha^H of eq. 16 (rows
        sum to 1). Always the weights with AP_m = similarity . h_{<=m}: uniform under
        comp_agg=False, one-hot on layer m under hierarchical=False, [1] for m = 0.
    domain_attention [M+1, D, D]: alpha^D of eq. 14; the identity where the reference prototypes
        are not used (m = 0, self_attention=False, comp_agg=False, hierarchical=False).
    """

    ratios: Tensor
    similarity: list[Tensor]
    domain_attention: Tensor


class HierarchicalRelational(nn.Module):
    """Prototypes [M+1, D, F] -> domain-relational ratios r [M+1, D] (sections 2.2-2.3).

    One DomainGraph per layer m = 0..M (the embedding layer is m = 0). For m >= 1 the graph
    input is the aggregated prototype AP_m (eqs. 13-16); for m = 0 there is a single candidate
    prototype, so AP_0 = h_0 and no W^D_0 / W^H_0 exist (they could not receive a gradient).

    graph_hidden None means F' = feature_dim, the authors' choice; graph_heads=8 and
    dropout=0.1 are their defaults too. Ablations (Table 4): self_attention=False (RP = h),
    comp_agg=False (plain mean of layers 0..m), hierarchical=False (graph input h_m only).
    graph_skip=True adds the root term W_self h_i to both graph layers (not in the paper);
    graph_output_elu=False makes layer 2 linear (not in the paper; see :class:`DomainGraph`).
    """

    def __init__(
        self,
        num_layers: int,
        num_domains: int,
        feature_dim: int,
        graph_hidden: int | None = None,
        graph_heads: int = 8,
        dropout: float = 0.1,
        *,
        self_attention: bool = True,
        comp_agg: bool = True,
        hierarchical: bool = True,
        graph_skip: bool = False,
        graph_output_elu: bool = True,
    ) -> None:
        super().__init__()
        _positive("num_layers", num_layers)
        _positive("num_domains", num_domains)
        _positive("feature_dim", feature_dim)
        if not 0.0 <= dropout < 1.0:
            raise HRKDError(f"graph dropout must be in [0, 1), got {dropout}")
        self.num_layers = num_layers
        self.num_domains = num_domains
        self.feature_dim = feature_dim
        self.hierarchical = hierarchical
        self.uses_reference = hierarchical and comp_agg
        hidden = feature_dim if graph_hidden is None else graph_hidden
        self.graphs = nn.ModuleList(
            DomainGraph(feature_dim, hidden, graph_heads, dropout=dropout, skip=graph_skip, output_elu=graph_output_elu)
            for _ in range(num_layers + 1)
        )
        # Index m-1 holds layer m's modules; layer 0 has none (see the class docstring).
        self.references = nn.ModuleList(
            ReferencePrototypes(feature_dim, self_attention=self_attention)
            for _ in range(num_layers if self.uses_reference else 0)
        )
        self.aggregators = nn.ModuleList(
            CompareAggregate(num_domains, feature_dim, comp_agg=comp_agg)
            for _ in range(num_layers if hierarchical else 0)
        )

    def forward(self, prototypes: Tensor) -> RelationalOutput:
        expected = (self.num_layers + 1, self.num_domains, self.feature_dim)
        if tuple(prototypes.shape) != expected:
            raise ValueError(f"prototypes must be [M+1, D, F] = {list(expected)}, got {list(prototypes.shape)}")
        domains = self.num_domains
        eye = torch.eye(domains, dtype=prototypes.dtype, device=prototypes.device)
        ratios, similarity, domain_attention = [], [], []
        for m, graph in enumerate(self.graphs):
            attention = eye
            if m == 0 or not self.hierarchical:
                nodes = prototypes[m]
                weights = prototypes.new_zeros(domains, m + 1)
                weights[:, m] = 1.0
            else:
                reference = None
                if self.uses_reference:
                    reference, attention = self.references[m - 1](prototypes[m])
                nodes, weights = self.aggregators[m - 1](prototypes[: m + 1], reference)
            ratios.append(graph(nodes))
            similarity.append(weights)
            domain_attention.append(attention)
        return RelationalOutput(torch.stack(ratios), similarity, torch.stack(domain_attention))


# --------------------------------------------------------------------------- diagnostics


# The summary diagnostics a run's metrics keep, with the report's column names.
DIAGNOSTIC_KEYS = {"mean_spread": "spread", "mean_normalised_entropy": "norm. entropy", "mean_max_abs_dev": "max |r−1/D|"}


def ratio_diagnostics(ratios: Tensor) -> dict[str, float | list[float]]:
    """How far the ratios r [M+1, D] are from uniform, per layer and averaged.

    spread = max_d r - min_d r; entropy in nats; normalised_entropy = entropy / log D (1 means
    exactly uniform; defined as 1 when D = 1); max_abs_dev = max_d |r - 1/D|. Collapsed
    ratios (the plain graph's usual state) show spread near 0 and normalised entropy near 1.
    """
    if ratios.dim() != 2:
        raise ValueError(f"ratios must be [M+1, D], got {tuple(ratios.shape)}")
    r = ratios.detach().to(torch.float64)
    domains = r.shape[1]
    spread = r.max(dim=1).values - r.min(dim=1).values
    entropy = -(torch.where(r > 0, r * r.log(), torch.zeros_like(r))).sum(dim=1)
    normalised = entropy / math.log(domains) if domains > 1 else torch.ones_like(entropy)
    deviation = (r - 1.0 / domains).abs().max(dim=1).values
    return {
        "spread": spread.tolist(),
        "entropy": entropy.tolist(),
        "normalised_entropy": normalised.tolist(),
        "max_abs_dev": deviation.tolist(),
        "mean_spread": spread.mean().item(),
        "mean_entropy": entropy.mean().item(),
        "mean_normalised_entropy": normalised.mean().item(),
        "mean_max_abs_dev": deviation.mean().item(),
    }


# A layer's ratios are "uniform" when they are 1/D to fp32 rounding (the collapsed graph), and
# "one-hot" when their normalised entropy is below ONE_HOT_ENTROPY: at D = 4 that is the entropy of
# (0.95, 0.017, 0.017, 0.017), so the top domain holds ~95 % and the others' intermediate-layer KD
# is down by ~50x (at D = 5, 0.2 is reached with the top domain at ~94 %).
UNIFORM_SPREAD = 1e-6
ONE_HOT_ENTROPY = 0.2
REGIMES = ("uniform", "learned", "one-hot")


def layer_regimes(ratios: Tensor) -> list[str]:
    """Per layer of r [M+1, D]: ``uniform``, ``one-hot`` or ``learned`` (in between)."""
    d = ratio_diagnostics(ratios)
    return ["uniform" if spread < UNIFORM_SPREAD else "one-hot" if entropy < ONE_HOT_ENTROPY else "learned"
            for spread, entropy in zip(d["spread"], d["normalised_entropy"])]


def regime_counts(ratios: Tensor) -> dict[str, int]:
    """How many layers of r are in each regime: ``{"uniform_layers": .., "learned_layers": .., "one_hot_layers": ..}``."""
    layers = layer_regimes(ratios)
    return {f"{name.replace('-', '_')}_layers": layers.count(name) for name in REGIMES}


def regime_of_counts(counts: dict[str, int | float]) -> str:
    """One word for a run: ``one-hot`` if any layer is, ``uniform`` if all are, else ``learned``."""
    if counts["one_hot_layers"] > 0:
        return "one-hot"
    return "learned" if counts["learned_layers"] > 0 else "uniform"


def ratio_regime(ratios: Tensor) -> str:
    """:func:`regime_of_counts` of r [M+1, D]."""
    return regime_of_counts(regime_counts(ratios))
