"""distill.ratios=dro must not fall into the graph's exactly-uniform, zero-gradient state.

On real data (small profile, all 3 hrkd-dro seeds) the adversary drove every node's layer-2 input
to -20..-35 within ~10 steps: ELU(x) = -1 to fp32 there, so r = 1/D exactly (dropout on or off)
and the gradient exp(x) ~ 1e-10 never lets it out. dro now uses a linear, zero-initialised output
layer and a smaller learning rate for the graph.
"""

from __future__ import annotations

import torch

from hrkd.config import Distill
from hrkd.distill.ratios import _graph_ctor, graph_arguments
from hrkd.engine import param_groups
from hrkd.losses import robust_ratio_loss
from hrkd.relational import HierarchicalRelational

M, D, F = 2, 4, 32
# Near-uniform relative losses, as on real checkpoints (0.85-1.15 of the row mean).
BASE = torch.tensor([[1.00, 1.05, 0.95, 1.00], [1.10, 1.00, 0.90, 1.00], [1.15, 1.05, 0.85, 0.95]])


def dro_graph() -> HierarchicalRelational:
    torch.manual_seed(1)
    return HierarchicalRelational(**_graph_ctor(graph_arguments("hrkd-dro", Distill(), M, D, F)))


def test_dro_graph_does_not_collapse_to_exactly_uniform_on_near_uniform_losses():
    """Prototypes that share a large component and noisy near-uniform losses: the real-data setting."""
    graph = dro_graph().train()  # dropout on, as in training
    opt = torch.optim.AdamW(graph.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(2)
    common = 2 * torch.randn(M + 1, 1, F, generator=gen)
    for _ in range(60):
        protos = common + 0.3 * torch.randn(M + 1, D, F, generator=gen)
        losses = BASE * (1 + 0.05 * torch.randn(M + 1, D, generator=gen))
        opt.zero_grad()
        robust_ratio_loss(graph(protos).ratios, losses, 1.0).backward()
        opt.step()
    grad = sum(float(p.grad.pow(2).sum()) for p in graph.parameters() if p.grad is not None) ** 0.5
    assert grad > 1e-3  # before: ~1e-7, the saturated ELU
    protos = common + 0.3 * torch.randn(M + 1, D, F, generator=gen)
    for mode in (False, True):
        r = graph.train(mode)(protos).ratios.detach()
        spread = r.max(dim=1).values - r.min(dim=1).values
        assert (spread > 1e-3).all(), (mode, spread)  # before: exactly 0 in every layer, both modes


def test_dro_graph_starts_uniform_with_a_live_gradient():
    graph = dro_graph().eval()
    assert all(not g.second.activation for g in graph.graphs)
    r = graph(torch.randn(M + 1, D, F)).ratios
    assert torch.equal(r, torch.full_like(r, 1.0 / D))  # the KL term's prior, exactly
    robust_ratio_loss(r, BASE, 1.0).backward()
    # Through the skip term: at zero the shared neighbourhood average gives every node the same logit.
    assert all(float(g.second.self_weight.grad.abs().sum()) > 0 for g in graph.graphs)


def test_paper_graph_keeps_the_elu_and_old_saved_graphs_load_with_it():
    args = graph_arguments("hrkd", Distill(), M, D, F)
    assert args["graph_output_elu"] is True
    old = {k: v for k, v in args.items() if k != "graph_output_elu"}  # relational.json written before the fix
    assert _graph_ctor(old)["graph_output_elu"] is True


def test_dro_graph_learning_rate_scale():
    class Obj(torch.nn.Module):
        def __init__(self, scales):
            super().__init__()
            self.student = torch.nn.Linear(3, 3)
            self.graph = torch.nn.Linear(3, 3)
            self.lr_scales = scales

    plain = param_groups(Obj({}), 0.01, 1e-3)
    assert len(plain) == 2 and all("lr" not in g for g in plain)
    scaled = [g for g in param_groups(Obj({"graph.": 0.1}), 0.01, 1e-3) if "lr" in g]
    assert sorted(len(g["params"]) for g in scaled) == [1, 1] and all(abs(g["lr"] - 1e-4) < 1e-12 for g in scaled)
    assert {g["weight_decay"] for g in scaled} == {0.0, 0.01}
