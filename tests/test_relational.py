"""Sections 2.2-2.3 (eqs. 6-16): prototypes, graphs, reference prototypes, compare-aggregate, collapse."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hrkd.errors import HRKDError
from hrkd.relational import (
    CompareAggregate,
    DomainGraph,
    GraphAttentionLayer,
    HierarchicalRelational,
    ReferencePrototypes,
    layer_prototypes,
    ratio_diagnostics,
    stack_domain_prototypes,
)

E = math.e


def similar_prototypes(shape: tuple[int, ...], spread: float, seed: int) -> torch.Tensor:
    """Prototypes like a real encoder's: one shared direction plus small per-domain offsets."""
    gen = torch.Generator().manual_seed(seed)
    *lead, domains, features = shape
    base = torch.randn(*lead, 1, features, generator=gen)
    return base + spread * torch.randn(*shape, generator=gen)


# --------------------------------------------------------------------------- eq. 6


EMB = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # [B=2, L=2, F=2]
HID = torch.tensor([[[0.0, 0.0], [2.0, 2.0]], [[4.0, 4.0], [0.0, 0.0]]])
PAD_MASK = torch.tensor([[1, 1], [1, 0]])


def test_layer_prototypes_average_every_position_by_default() -> None:
    # Embeddings: (1+3+5+7)/4 = 4, (2+4+6+8)/4 = 5. Hidden: (0+2+4+0)/4 = 1.5 in both dims.
    protos = layer_prototypes(EMB, [HID])
    assert torch.allclose(protos, torch.tensor([[4.0, 5.0], [1.5, 1.5]]))


def test_layer_prototypes_masked_average_skips_padding() -> None:
    # Real tokens only: embeddings (1,2), (3,4), (5,6) -> (3, 4); hidden (0,0), (2,2), (4,4) -> (2, 2).
    protos = layer_prototypes(EMB, [HID], PAD_MASK)
    assert torch.allclose(protos, torch.tensor([[3.0, 4.0], [2.0, 2.0]]))
    changed = EMB.clone()
    changed[1, 1] = 100.0
    assert torch.equal(layer_prototypes(changed, [HID], PAD_MASK), protos)
    assert not torch.equal(layer_prototypes(changed, [HID]), layer_prototypes(EMB, [HID]))


def test_layer_prototypes_shape_and_all_padding_error() -> None:
    assert layer_prototypes(torch.zeros(3, 5, 4), [torch.zeros(3, 5, 4)] * 4).shape == (5, 4)
    with pytest.raises(ValueError, match="every token"):
        layer_prototypes(EMB, [HID], torch.zeros(2, 2))


def test_stack_domain_prototypes_orders_layer_domain_feature() -> None:
    a, b = torch.zeros(3, 4), torch.ones(3, 4)
    stacked = stack_domain_prototypes([a, b])
    assert stacked.shape == (3, 2, 4)
    assert torch.equal(stacked[:, 1], b) and torch.equal(stacked[:, 0], a)


# --------------------------------------------------------------------------- eqs. 7-12


def reference_gat(layer: GraphAttentionLayer, nodes: torch.Tensor) -> torch.Tensor:
    """Eqs. 7-9 written as loops over heads k and nodes i, j, straight from the paper."""
    heads, f_out = layer.weight.shape[0], layer.out_features
    outputs = []
    for i in range(nodes.shape[0]):
        per_head = []
        for k in range(heads):
            w, a = layer.weight[k], layer.attention[k]
            s = torch.stack([a @ torch.cat([nodes[i] @ w, nodes[j] @ w]) for j in range(nodes.shape[0])])
            alpha = torch.softmax(F.leaky_relu(s, 0.2), dim=0)
            total = sum(alpha[j] * (nodes[j] @ w) for j in range(nodes.shape[0]))
            if layer.self_weight is not None:
                total = total + nodes[i] @ layer.self_weight[k]
            per_head.append(F.elu(total))
        outputs.append(torch.cat(per_head))
    assert outputs[0].shape == (heads * f_out,)
    return torch.stack(outputs)


@pytest.mark.parametrize("skip", [False, True])
def test_graph_attention_layer_matches_equations(skip: bool) -> None:
    torch.manual_seed(0)
    layer = GraphAttentionLayer(5, 3, 2, dropout=0.0, skip=skip)
    nodes = torch.randn(4, 5)
    out, attention = layer(nodes)
    assert out.shape == (4, 6) and attention.shape == (2, 4, 4)
    assert torch.allclose(out, reference_gat(layer, nodes), atol=1e-5)
    assert torch.allclose(attention.sum(-1), torch.ones(2, 4))


def test_domain_graph_gives_a_distribution_over_domains() -> None:
    torch.manual_seed(0)
    graph = DomainGraph(6, 4, 3, skip=True).eval()
    ratios = graph(torch.randn(5, 6))
    assert ratios.shape == (5,)
    assert ratios.sum().item() == pytest.approx(1.0, abs=1e-6)
    # Eq. 10 layer 2 has W' [K*F' -> 1] and a' in R^2.
    assert graph.second.weight.shape == (1, 12, 1) and graph.second.attention.shape == (1, 2)


# --------------------------------------------------------------------------- eqs. 13-14


def test_reference_prototypes_hand_computed() -> None:
    module = ReferencePrototypes(2)
    with torch.no_grad():
        module.weight.copy_(torch.eye(2))
    h = torch.eye(2)
    # h W h^T = I -> each row softmax([1, 0]) = [e, 1] / (e + 1); RP = alpha h = alpha.
    rp, alpha = module(h)
    expected = torch.tensor([[E, 1.0], [1.0, E]]) / (E + 1)
    assert torch.allclose(alpha, expected) and torch.allclose(rp, expected)


def test_reference_prototypes_ablation_returns_own_prototypes() -> None:
    h = torch.randn(3, 4)
    rp, alpha = ReferencePrototypes(4, self_attention=False)(h)
    assert torch.equal(rp, h) and torch.equal(alpha, torch.eye(3))
    assert len(list(ReferencePrototypes(4, self_attention=False).parameters())) == 0


# --------------------------------------------------------------------------- eqs. 15-16


def test_compare_aggregate_hand_computed() -> None:
    module = CompareAggregate(1, 2)
    with torch.no_grad():
        module.weight.copy_(torch.eye(2)[None])
    history = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # layers 0 and 1 of one domain
    reference = torch.tensor([[1.0, 1.0]])
    # Scores h_l . RP: 1 and 2 -> alpha = [1, e] / (1 + e); AP = alpha_0 [1, 0] + alpha_1 [0, 2].
    ap, alpha = module(history, reference)
    a0, a1 = 1 / (1 + E), E / (1 + E)
    assert torch.allclose(alpha, torch.tensor([[a0, a1]]))
    assert torch.allclose(ap, torch.tensor([[a0, 2 * a1]]))


def test_compare_aggregate_uses_a_matrix_per_domain() -> None:
    module = CompareAggregate(2, 3)
    history, reference = torch.randn(3, 1, 3).expand(3, 2, 3), torch.randn(1, 3).expand(2, 3)
    # Same inputs for both domains: only W^H_{m,d} can tell them apart.
    _, alpha = module(history, reference)
    assert not torch.allclose(alpha[0], alpha[1])


def test_compare_aggregate_ablation_is_the_plain_mean() -> None:
    history = torch.randn(3, 2, 4)
    ap, alpha = CompareAggregate(2, 4, comp_agg=False)(history, None)
    assert torch.equal(ap, history.mean(dim=0))
    assert torch.equal(alpha, torch.full((2, 3), 1 / 3))


# --------------------------------------------------------------------------- full module

M, D, FEAT = 2, 3, 6


def build(**switches: bool) -> HierarchicalRelational:
    # Skip graphs and no dropout: the plain graph collapses to 1/D (tested below), which would
    # hide every difference these tests look for.
    torch.manual_seed(0)
    switches.setdefault("graph_skip", True)
    return HierarchicalRelational(M, D, FEAT, graph_hidden=4, graph_heads=2, dropout=0.0, **switches).eval()


def test_full_module_shapes_and_normalisation() -> None:
    out = build()(torch.randn(M + 1, D, FEAT))
    assert out.ratios.shape == (M + 1, D)
    assert torch.allclose(out.ratios.sum(-1), torch.ones(M + 1))
    assert [tuple(s.shape) for s in out.similarity] == [(D, 1), (D, 2), (D, 3)]
    for s in out.similarity:
        assert torch.allclose(s.sum(-1), torch.ones(D))
    assert out.domain_attention.shape == (M + 1, D, D)
    assert torch.allclose(out.domain_attention.sum(-1), torch.ones(M + 1, D))
    assert torch.equal(out.domain_attention[0], torch.eye(D))  # layer 0 has nothing to compare
    assert not torch.equal(out.domain_attention[1], torch.eye(D))


def test_parameter_inventory_follows_the_equations() -> None:
    names = dict(build().named_parameters())
    assert len([n for n in names if n.endswith("first.weight")]) == M + 1  # one graph per layer 0..M
    assert names["references.0.weight"].shape == (FEAT, FEAT)  # W^D_m
    assert names["aggregators.0.weight"].shape == (D, FEAT, FEAT)  # W^H_{m,d}
    assert "references.0.weight" not in dict(build(self_attention=False).named_parameters())
    flat = dict(build(hierarchical=False).named_parameters())
    assert not any(n.startswith(("references", "aggregators")) for n in flat)


def test_each_ablation_changes_the_ratios_with_shared_parameters() -> None:
    protos = torch.randn(M + 1, D, FEAT)
    full = build()
    state = full.state_dict()
    baseline = full(protos).ratios
    for switch in ("self_attention", "comp_agg", "hierarchical"):
        ablated = build(**{switch: False})
        ablated.load_state_dict(state, strict=False)  # same graphs, fewer modules
        assert not torch.allclose(ablated(protos).ratios, baseline), switch


def test_self_attention_ablation_compares_with_own_prototypes() -> None:
    protos = torch.randn(M + 1, D, FEAT)
    module = build(self_attention=False)
    out = module(protos)
    for m in range(1, M + 1):
        ap, alpha = module.aggregators[m - 1](protos[: m + 1], protos[m])  # RP_m = h_m
        assert torch.allclose(out.similarity[m], alpha)
        assert torch.allclose(out.ratios[m], module.graphs[m](ap))
    assert torch.equal(out.domain_attention, torch.eye(D).expand(M + 1, D, D))


def test_comp_agg_ablation_feeds_the_plain_mean() -> None:
    protos = torch.randn(M + 1, D, FEAT)
    module = build(comp_agg=False)
    out = module(protos)
    for m in range(M + 1):
        assert torch.allclose(out.ratios[m], module.graphs[m](protos[: m + 1].mean(dim=0)))
        assert torch.equal(out.similarity[m], torch.full((D, m + 1), 1 / (m + 1)))


def test_hierarchical_ablation_feeds_the_current_layer_only() -> None:
    protos = torch.randn(M + 1, D, FEAT)
    module = build(hierarchical=False)
    out = module(protos)
    for m in range(M + 1):
        assert torch.equal(out.ratios[m], module.graphs[m](protos[m]))
        assert torch.equal(out.similarity[m][:, m], torch.ones(D))


def test_gradients_reach_every_parameter_and_the_prototypes() -> None:
    module = build()
    protos = torch.randn(M + 1, D, FEAT, requires_grad=True)
    # The rows of r sum to 1, so a plain sum would have zero gradient; weight one domain.
    module(protos).ratios[:, 0].sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert protos.grad.abs().sum() > 0


def test_frozen_module_passes_gradients_to_the_student_only() -> None:
    module = build().requires_grad_(False)
    protos = torch.randn(M + 1, D, FEAT, requires_grad=True)
    module(protos).ratios[:, 0].sum().backward()
    assert all(p.grad is None for p in module.parameters())
    assert protos.grad is not None and protos.grad.abs().sum() > 0


def test_rejects_wrong_prototype_shape_and_bad_config() -> None:
    with pytest.raises(ValueError, match=r"\[M\+1, D, F\]"):
        build()(torch.randn(M, D, FEAT))
    with pytest.raises(HRKDError, match="num_domains"):
        HierarchicalRelational(2, 0, 4)
    with pytest.raises(HRKDError, match="dropout"):
        HierarchicalRelational(2, 2, 4, dropout=1.0)


# --------------------------------------------------------------------------- diagnostics


def test_ratio_diagnostics_hand_computed() -> None:
    ratios = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1], [1.0, 0.0, 0.0, 0.0]])
    entropy_mid = -(0.4 * math.log(0.4) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    diag = ratio_diagnostics(ratios)
    assert diag["spread"] == pytest.approx([0.0, 0.3, 1.0])
    assert diag["entropy"] == pytest.approx([math.log(4), entropy_mid, 0.0])  # 0 log 0 taken as 0
    assert diag["normalised_entropy"] == pytest.approx([1.0, entropy_mid / math.log(4), 0.0])
    assert diag["max_abs_dev"] == pytest.approx([0.0, 0.15, 0.75])
    assert diag["mean_spread"] == pytest.approx(1.3 / 3)
    assert diag["mean_entropy"] == pytest.approx((math.log(4) + entropy_mid) / 3)


# --------------------------------------------------------------------------- ratio collapse

TARGET = torch.tensor([0.4, 0.3, 0.2, 0.1])


def fit_graph(skip: bool, seed: int, steps: int = 300) -> torch.Tensor:
    """Fit only DomainGraph's parameters so that r matches TARGET (KL) on fixed prototypes."""
    torch.manual_seed(seed)
    graph = DomainGraph(32, 16, 4, dropout=0.0, skip=skip)
    nodes = similar_prototypes((4, 32), spread=0.1, seed=seed)
    optimiser = torch.optim.Adam(graph.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = F.kl_div(graph(nodes).log(), TARGET, reduction="sum")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return graph(nodes)


def test_only_the_skip_graph_can_learn_non_uniform_ratios(one_thread: None) -> None:
    # Measured over seeds 0-9 in this exact setting: the skip graph reaches the target (max error
    # < 1e-3) in 9 of 10 runs; seed 2 dies with all four ELU outputs stuck at -1 (zero gradient).
    # The plain graph ends at exactly 1/D (spread < 1e-6) in 10 of 10. Seeds 0-3 keep that ratio.
    skip_errors = [(fit_graph(True, seed) - TARGET).abs().max().item() for seed in range(4)]
    plain = [fit_graph(False, seed) for seed in range(4)]
    assert sum(error < 0.02 for error in skip_errors) >= 3, skip_errors
    assert all((r.max() - r.min()).item() < 1e-3 for r in plain), plain


def test_plain_graph_attention_rows_are_identical() -> None:
    # The mechanism: every query scores its neighbours by a_key . W h_j plus a constant of its
    # own; on one side of LeakyReLU's kink that constant cancels in the softmax.
    torch.manual_seed(0)
    graph = DomainGraph(32, 16, 4, dropout=0.0).eval()
    nodes = similar_prototypes((4, 32), spread=0.1, seed=0)
    _, attention = graph.first(nodes)
    assert torch.allclose(attention, attention[:, :1].expand_as(attention), atol=1e-6)
    hidden, _ = graph.first(nodes)
    assert torch.allclose(hidden, hidden[:1].expand_as(hidden), atol=1e-5)  # identical node outputs


def test_collapsed_plain_graph_has_no_gradient() -> None:
    # With identical logits, d KL / d theta = sum_d (r_d - target_d) dz/dtheta = 0 because the
    # r_d - target_d sum to zero. Adam's normalisation can still amplify rounding noise.
    nodes = similar_prototypes((4, 32), spread=0.1, seed=0)
    norms = {}
    for skip in (False, True):
        torch.manual_seed(0)
        graph = DomainGraph(32, 16, 4, dropout=0.0, skip=skip)
        F.kl_div(graph(nodes).log(), TARGET, reduction="sum").backward()
        norms[skip] = max(p.grad.abs().max().item() for p in graph.parameters())
    assert norms[False] < 1e-6
    assert norms[True] > 1e-3


def test_plain_ratios_at_bert_scale_sit_at_one_over_d() -> None:
    # Authors' MNLI setting: M = 4, D = 5, F = F' = 768 (the fit_dense output), K = 8.
    torch.manual_seed(0)
    module = HierarchicalRelational(4, 5, 768).eval()
    protos = similar_prototypes((5, 5, 768), spread=0.1, seed=1)
    with torch.no_grad():
        ratios = module(protos).ratios
    assert (ratios - 0.2).abs().max().item() < 0.01
    diag = ratio_diagnostics(ratios)
    assert diag["mean_normalised_entropy"] > 0.999

    # In train mode (the authors call meta_graph.train()) dropout gives each node a different
    # input, so r moves away from 1/D, differently on every call: noise, not relations.
    module.train()
    torch.manual_seed(3)
    with torch.no_grad():
        first, second = module(protos).ratios, module(protos).ratios
    assert (first - 0.2).abs().max().item() > 0.01
    assert not torch.allclose(first, second)


# --------------------------------------------------------------------------- the collapse, exactly
# When r_m is exactly 1/D (docs/hrkd-method.md, "Ratio collapse"): a GAT layer whose every head
# has all its pairwise scores a^T[W h_i (+) W h_j] on one side of LeakyReLU's kink is linear there,
# the query term cancels in the softmax, every node gets the same attention row and the same
# output; one such layer of the two makes r_m = 1/D. Both layers straddling the kink is necessary,
# not sufficient, for r_m != 1/D.


def gat_scores(layer, nodes: torch.Tensor) -> torch.Tensor:
    """Pre-LeakyReLU scores [K, D, D] of a GraphAttentionLayer, recomputed from its parameters."""
    transformed = torch.einsum("df,kfo->kdo", nodes, layer.weight)
    a_query, a_key = layer.attention.split(layer.out_features, dim=-1)
    return (torch.einsum("kdo,ko->kd", transformed, a_query)[:, :, None]
            + torch.einsum("kdo,ko->kd", transformed, a_key)[:, None, :])


def one_sided(scores: torch.Tensor) -> bool:
    """Every head's scores on one side of the kink."""
    flat = scores.flatten(1)
    return bool(((flat > 0).all(1) | (flat < 0).all(1)).all())


def graph_inputs(module: HierarchicalRelational, protos: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    nodes: list[torch.Tensor] = []
    hooks = [g.register_forward_pre_hook(lambda _m, args: nodes.append(args[0])) for g in module.graphs]
    try:
        with torch.no_grad():
            ratios = module(protos).ratios
    finally:
        for hook in hooks:
            hook.remove()
    return ratios, nodes


def test_one_sided_scores_in_either_gat_layer_give_exactly_uniform_ratios(one_thread: None) -> None:
    """(a) Over 40 seeds x 4 layers, dissimilar prototypes: wherever one GAT layer is one-sided,
    r_m is 1/D up to float32 rounding, and every non-uniform r_m has both layers
    straddling the kink. Measured: 133 of 160 layers one-sided, 27 straddling, 21 of those non-uniform."""
    one_sided_count = non_uniform = 0
    for seed in range(40):
        torch.manual_seed(seed)
        module = HierarchicalRelational(3, 4, 16, graph_heads=4).eval()
        ratios, nodes = graph_inputs(module, similar_prototypes((4, 4, 16), spread=1.0, seed=seed) * 5)
        for m, (graph, x) in enumerate(zip(module.graphs, nodes)):
            with torch.no_grad():
                hidden, _ = graph.first(x)
                collapsed = one_sided(gat_scores(graph.first, x)) or one_sided(gat_scores(graph.second, hidden))
            deviation = (ratios[m] - 0.25).abs().max().item()
            if collapsed:
                one_sided_count += 1
                assert deviation < 1e-6, (seed, m, deviation)  # float32 rounding of identical rows
            elif deviation > 1e-4:
                non_uniform += 1
    assert one_sided_count >= 100 and non_uniform >= 10, (one_sided_count, non_uniform)


def test_per_domain_layer_choice_makes_ratios_non_uniform_in_eval_mode() -> None:
    """(b) A constructed case: at init, eval mode, no dropout and no training, eq. 16's per-domain
    W^H lets the domains' aggregated prototypes differ enough that both GAT layers of graph 1
    straddle the kink: r_1 is 0.12 away from 1/D, while layer 0 (the raw prototypes) stays at 1/D."""
    torch.manual_seed(8)
    module = HierarchicalRelational(3, 4, 16, graph_heads=4).eval()
    ratios, nodes = graph_inputs(module, similar_prototypes((4, 4, 16), spread=1.0, seed=8) * 5)
    assert (ratios[0] - 0.25).abs().max().item() < 1e-6
    assert (ratios[1] - 0.25).abs().max().item() > 0.1
    graph = module.graphs[1]
    with torch.no_grad():
        hidden, _ = graph.first(nodes[1])
    assert not one_sided(gat_scores(graph.first, nodes[1])) and not one_sided(gat_scores(graph.second, hidden))
    # the same module without the hierarchy (graph input h_m, no W^H) is uniform on these prototypes
    torch.manual_seed(8)
    flat = HierarchicalRelational(3, 4, 16, graph_heads=4, hierarchical=False).eval()
    with torch.no_grad():
        assert (flat(similar_prototypes((4, 4, 16), spread=1.0, seed=8) * 5).ratios[1] - 0.25).abs().max().item() < 1e-6


def test_minimising_eq17_over_the_ratios_drifts_to_one_hot(one_thread: None) -> None:
    """(c) Eq. 17 is linear in r: a graph that can move r (skip term), trained on sum_d r_d L_d with
    the student's per-domain losses fixed, puts all mass on the lowest-loss domain within a few
    hundred Adam steps, switching the other domains' intermediate-layer KD off."""
    torch.manual_seed(0)
    graph = DomainGraph(32, 16, 4, dropout=0.0, skip=True)
    nodes = similar_prototypes((4, 32), spread=0.1, seed=0)
    losses = torch.tensor([1.4, 1.2, 0.03, 1.3])  # the per-domain layer losses the issue measured
    optimiser = torch.optim.Adam(graph.parameters(), lr=1e-2)
    for _ in range(200):
        loss = (graph(nodes) * losses).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        r = graph(nodes)
    assert r.argmax().item() == 2 and r[2].item() > 0.99, r
