"""How the ratios learn (distill.ratios): the robust objective by hand, its known optimum, regimes, warnings."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from hrkd.config import Distill
from hrkd.distill.objective import ratio_logs
from hrkd.distill.ratios import graph_arguments, ratio_learning
from hrkd.errors import HRKDError
from hrkd.losses import layer_losses, robust_ratio_loss, total_kd_loss
from hrkd.relational import HierarchicalRelational, layer_regimes, ratio_regime, regime_counts
from helpers import build, step_batch, toy_task

LOSSES = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 2.0]])  # [M+1, D]: row 0 embedding, row 1 a layer


def target(losses: torch.Tensor, tau: float) -> torch.Tensor:
    """The closed-form maximiser of sum r Lrel - tau KL(r || u): softmax(Lrel / tau) per row."""
    return torch.softmax(losses / losses.mean(dim=1, keepdim=True) / tau, dim=1)


def test_robust_ratio_loss_by_hand():
    r = torch.tensor([[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    tau = 0.5
    rel = [[0.5, 1.0, 1.5], [0.5, 0.5, 2.0]]  # L / mean_d L per row
    gain = sum(r[m, d].item() * rel[m][d] for m in range(2) for d in range(3))
    kl = sum(p * math.log(3 * p) for p in (0.2, 0.3, 0.5))  # row 1 is uniform: KL 0
    assert robust_ratio_loss(r, LOSSES, tau).item() == pytest.approx(-(gain - tau * kl), rel=1e-6)
    with pytest.raises(ValueError, match="must both be"):
        robust_ratio_loss(r, LOSSES[:1], tau)
    with pytest.raises(HRKDError, match="dro_tau"):
        robust_ratio_loss(r, LOSSES, 0.0)


def test_free_ratios_trained_on_the_robust_loss_reach_the_closed_form_optimum():
    tau = 0.5
    logits = torch.zeros_like(LOSSES, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        robust_ratio_loss(torch.softmax(logits, 1), LOSSES, tau).backward()
        opt.step()
    r = torch.softmax(logits, 1).detach()
    assert torch.allclose(r, target(LOSSES, tau), atol=2e-3)
    # Up-weights the worst-distilled domain, neither uniform nor one-hot.
    assert r[0].argmax() == 2 and r[1].argmax() == 2
    assert layer_regimes(r) == ["learned", "learned"]


def test_the_graph_trained_on_the_robust_loss_learns_ratios_that_follow_the_losses():
    """A skip graph on fixed prototypes and losses: r approaches softmax(Lrel / tau), where eq. 17 drives it one-hot."""
    torch.manual_seed(0)
    M, D, F = 1, 3, 6
    protos = torch.randn(M + 1, D, F)
    tau = 0.5

    def train(objective) -> torch.Tensor:
        torch.manual_seed(1)
        graph = HierarchicalRelational(M, D, F, graph_hidden=8, graph_heads=2, dropout=0.0, graph_skip=True)
        opt = torch.optim.Adam(graph.parameters(), lr=1e-2)
        for _ in range(400):
            opt.zero_grad()
            objective(graph(protos).ratios).backward()
            opt.step()
        return graph(protos).ratios.detach()

    robust = train(lambda r: robust_ratio_loss(r, LOSSES, tau))
    assert torch.allclose(robust, target(LOSSES, tau), atol=0.03)
    assert ratio_regime(robust) == "learned"
    paper = train(lambda r: (r * LOSSES).sum())  # eq. 17's ratio part, minimised
    assert ratio_regime(paper) == "one-hot"
    assert paper[0].argmax() == 0  # all mass on the lowest loss: the degenerate optimum


def test_regimes_and_counts():
    r = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.3, 0.2], [0.98, 0.01, 0.01]])
    assert layer_regimes(r) == ["uniform", "learned", "one-hot"]
    assert regime_counts(r) == {"uniform_layers": 1, "learned_layers": 1, "one_hot_layers": 1}
    assert ratio_regime(r) == "one-hot"
    assert ratio_regime(r[:2]) == "learned"
    assert ratio_regime(r[:1]) == "uniform"


def test_ratio_logs_per_layer():
    r = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    logs = ratio_logs(r)
    assert logs["ratio/m0/min"].item() == pytest.approx(0.2)
    assert logs["ratio/m0/max"].item() == pytest.approx(0.5)
    assert logs["ratio/m0/dev"].item() == pytest.approx(0.5 - 1 / 3)
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)) / math.log(3)
    assert logs["ratio/m0/entropy"].item() == pytest.approx(h)
    assert logs["ratio/m1/entropy"].item() == pytest.approx(1.0)
    assert logs["ratio/m1/dev"].item() == pytest.approx(0.0, abs=1e-7)


def test_switch_resolution_and_the_renamed_key():
    assert ratio_learning("hrkd", Distill()) == "paper"
    assert ratio_learning("hrkd", Distill(ratios="frozen")) == "frozen"
    assert ratio_learning("hrkd-dro", Distill(ratios="frozen")) == "dro"
    args = graph_arguments("hrkd-dro", Distill(), 2, 3, 8)
    assert args["graph_skip"] and args["ratios"] == "dro"
    assert not graph_arguments("hrkd", Distill(), 2, 3, 8)["graph_skip"]
    with pytest.raises(ValueError, match="replaced by distill.ratios.*ratios: frozen"):
        Distill(graph_trainable=False)


def test_dro_step_student_sees_constant_ratios_graph_ascends(kd_world):
    task = toy_task()
    db = step_batch(task)
    obj = build(kd_world, "hrkd-dro", dro_tau=0.7)
    assert obj.graph_args["graph_skip"]
    so = obj.student_outputs(db)
    losses = obj.domain_losses(db, so, obj.teacher_outputs(db))
    rel = obj.relational(db, so, detach=True)
    loss, logs = obj(db)
    # The value is eq. 17 at the graph's r (the adversary adds a gradient, not a value).
    want = total_kd_loss(losses.embd, losses.attn, losses.hidn, losses.pred, obj.gamma, rel.ratios.detach())
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert logs["ratio_objective"].item() == pytest.approx(
        -robust_ratio_loss(rel.ratios, layer_losses(losses.embd, losses.attn, losses.hidn), 0.7).item(), rel=1e-5)
    loss.backward()
    graph_grads = {n: p.grad.clone() for n, p in obj.graph.named_parameters() if p.grad is not None}
    student_grads = {n: p.grad.clone() for n, p in obj.student.named_parameters() if p.grad is not None}
    # Graph: exactly the gradient of the robust loss alone.
    obj.zero_grad()
    r = obj.relational(db, obj.student_outputs(db), detach=True).ratios
    robust_ratio_loss(r, layer_losses(losses.embd, losses.attn, losses.hidn).detach(), 0.7).backward()
    for n, p in obj.graph.named_parameters():
        if n in graph_grads:
            assert torch.allclose(graph_grads[n], p.grad, atol=1e-6), n
    assert graph_grads and any(g.abs().sum() > 0 for g in graph_grads.values())
    # Student: exactly the gradient of eq. 17 with r held constant (nothing flows through r).
    obj.zero_grad()
    so = obj.student_outputs(db)
    l2 = obj.domain_losses(db, so, obj.teacher_outputs(db))
    total_kd_loss(l2.embd, l2.attn, l2.hidn, l2.pred, obj.gamma, rel.ratios.detach()).backward()
    for n, p in obj.student.named_parameters():
        if n in student_grads:
            assert torch.allclose(student_grads[n], p.grad, atol=1e-6), n


def test_frozen_ratios_have_no_trainable_graph(kd_world):
    obj = build(kd_world, "hrkd", ratios="frozen")
    assert not any(p.requires_grad for p in obj.graph.parameters())
    assert all(p.requires_grad for p in build(kd_world, "hrkd").graph.parameters())


def test_watch_warns_once_per_regime_change(kd_world, caplog):
    obj = build(kd_world, "hrkd").train()
    obj.ratio_watch_every = 2
    uniform = torch.full((3, 2), 0.5)
    hot = torch.tensor([[0.999, 0.001], [0.5, 0.5], [0.5, 0.5]])
    with caplog.at_level(logging.INFO, logger="hrkd.distill"):
        for r in (uniform, uniform, uniform, uniform, hot, hot):
            obj._watch_ratios(r)
    messages = [rec.getMessage() for rec in caplog.records]
    assert len(messages) == 2
    assert "step 2: HRKD ratios are uniform" in messages[0]
    assert "step 6: HRKD ratios are one-hot in layer(s) [0]" in messages[1]
    assert [rec.levelno for rec in caplog.records] == [logging.WARNING, logging.WARNING]
