"""Distillation objective (eqs. 1-17): by-hand totals, routing, ablations, graph training, teachers frozen."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hrkd.config import Distill
from hrkd.data.loading import collate
from hrkd.distill.batches import concat_domain_batches, make_distill_batch
from hrkd.distill.objective import KDObjective, ratio_logs
from hrkd.distill.ratios import relational_ratios
from hrkd.distill.teacher_models import teacher_checkpoints
from hrkd.engine import param_groups
from hrkd.errors import HRKDError
from hrkd.models import MultiDomainBert
from hrkd.relational import ratio_diagnostics
from helpers import DOMAINS, S_LAYERS, T_LAYERS, build, step_batch, toy_task

def hand_losses(obj, db, teacher_models, gamma=1.0, temperature=1.0):
    """Eqs. 1-4 written out with plain torch ops, pairing domain d's rows with teacher_models[d]."""
    b = db.batch
    with torch.no_grad():
        s = obj.student(b.input_ids, b.attention_mask, b.token_type_ids,
                        domain=b.domain_ids if obj.multi_head else None, taps=obj._student_taps)
    embd, attn, hidn, pred = [], [], [], []
    layer_map = [m * (T_LAYERS // S_LAYERS) for m in range(1, S_LAYERS + 1)]
    assert obj.layer_map == layer_map
    for d, (a, z) in enumerate(db.spans):
        with torch.no_grad():
            t = teacher_models[d](b.input_ids[a:z], b.attention_mask[a:z], b.token_type_ids[a:z],
                                  taps=obj._teacher_taps)
            p = obj.proj
            embd.append(((p[0](s.embeddings[a:z]) - t.embeddings) ** 2).mean())
            mask = b.attention_mask[a:z].bool()[:, None, None, :]
            attn.append(torch.stack([
                (((s.attention_scores[m][a:z] - t.attention_scores[n]) * mask) ** 2).mean()
                for m, n in zip(range(1, S_LAYERS + 1), layer_map)]))
            hidn.append(torch.stack([
                ((p[m](s.hidden_states[m - 1][a:z]) - t.hidden_states[n - 1]) ** 2).mean()
                for m, n in zip(range(1, S_LAYERS + 1), layer_map)]))
            pt = F.softmax(t.logits / temperature, -1)
            pred.append(-(pt * F.log_softmax(s.logits[a:z] / temperature, -1)).sum(-1).mean())
    return torch.stack(embd), torch.stack(attn, 1), torch.stack(hidn, 1), torch.stack(pred), s


def teacher(kd_world, domain, shared=False):
    path = kd_world["teachers"] / ("_shared" if shared else "") / domain
    return MultiDomainBert.from_classifier(path)


# -- totals by hand -------------------------------------------------------------------------------


def test_tinybert_total_equals_eq5_by_hand(kd_world):
    task = toy_task()
    obj = build(kd_world, "tinybert-kd", gamma=0.7)
    db = step_batch(task, (0,))
    assert db.spans == ((0, 4),) and db.batch.domain_ids.tolist() == [0] * 4
    loss, logs = obj(db)
    e, a, h, p, _ = hand_losses(obj, db, [teacher(kd_world, "books")])
    expected = e.sum() + a.sum() + h.sum() + 0.7 * p.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["attn"], a.sum(), rtol=1e-5, atol=1e-6)
    assert set(logs) == {"embd", "attn", "hidn", "pred"}


def test_multi_domain_routes_rows_to_their_own_teacher(kd_world):
    task = toy_task()
    obj = build(kd_world, "multi-domain-kd")
    db = step_batch(task)
    assert db.spans == ((0, 4), (4, 8))
    loss, _ = obj(db)
    right = [teacher(kd_world, d) for d in DOMAINS]
    e, a, h, p, _ = hand_losses(obj, db, right)
    torch.testing.assert_close(loss, e.sum() + a.sum() + h.sum() + p.sum(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        per = obj.domain_losses(db, obj.student_outputs(db), obj.teacher_outputs(db))
    torch.testing.assert_close(per.hidn, h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per.pred, p, rtol=1e-5, atol=1e-6)
    _, _, h2, p2, _ = hand_losses(obj, db, right[::-1])  # the wrong pairing gives other per-domain terms
    assert (per.hidn - h2).abs().max() > 1e-2 and (per.pred - p2).abs().max() > 1e-3


def test_shared_teacher_is_loaded_once_with_one_head_per_domain(kd_world):
    task = toy_task()
    obj = build(kd_world, "multi-domain-kd", checkpoint="shared")
    assert len(obj.teachers) == 1 and len(obj.teachers[0].model.heads) == 2  # one encoder forward per step
    db = step_batch(task)
    loss, _ = obj(db)
    e, a, h, p, _ = hand_losses(obj, db, [teacher(kd_world, d, shared=True) for d in DOMAINS])
    torch.testing.assert_close(loss, e.sum() + a.sum() + h.sum() + p.sum(), rtol=1e-5, atol=1e-6)


def test_hrkd_total_equals_eq17_by_hand(kd_world):
    task = toy_task()
    obj = build(kd_world, "hrkd", gamma=0.5)
    db = step_batch(task)
    loss, logs = obj(db)
    e, a, h, p, s = hand_losses(obj, db, [teacher(kd_world, d) for d in DOMAINS])
    protos = torch.stack([torch.stack([s.embeddings[x:y].mean((0, 1))] + [hs[x:y].mean((0, 1)) for hs in s.hidden_states])
                          for x, y in db.spans], 1)  # [M+1, D, F], eq. 6 over all positions
    with torch.no_grad():
        r = obj.graph(protos).ratios
    assert r.shape == (S_LAYERS + 1, 2)
    D = 2
    expected = sum(r[0, d] * e[d] + sum(r[m, d] * (a[m - 1, d] + h[m - 1, d]) for m in range(1, S_LAYERS + 1))
                   + 0.5 / D * p[d] for d in range(D))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    diag = ratio_diagnostics(r)
    assert logs["ratio_spread"].item() == pytest.approx(diag["mean_spread"], abs=1e-6)
    assert logs["ratio_entropy"].item() == pytest.approx(diag["mean_normalised_entropy"], abs=1e-6)


def test_masked_prototypes_and_query_masking_change_the_loss(kd_world):
    task = toy_task()
    db = step_batch(task)
    base = build(kd_world, "hrkd")(db)[0]
    # The plain graph's eval-mode ratios sit at 1/D whatever the prototypes (docs: ratio collapse);
    # the skip term lets the prototype averaging show up in r.
    skip = build(kd_world, "hrkd", graph_skip=True)(db)[0]
    assert not torch.isclose(skip, build(kd_world, "hrkd", graph_skip=True, prototype_padding=False)(db)[0])
    assert not torch.isclose(base, build(kd_world, "hrkd", mask_queries=True)(db)[0])
    assert torch.isclose(build(kd_world, "hrkd", class_mean=True)(db)[0] - base,
                         -0.5 * build(kd_world, "hrkd")(db)[1]["pred"] / 2, rtol=1e-4)  # gamma/D * pred / C less


# -- ablations ----------------------------------------------------------------------------------------


def test_no_domain_rel_is_multi_domain_kd_and_ablations_differ(kd_world):
    task = toy_task()
    db = step_batch(task)
    a, b = build(kd_world, "multi-domain-kd"), build(kd_world, "no-domain-rel")
    la, lb = a(db)[0], b(db)[0]
    assert torch.equal(la, lb)
    la.backward()
    lb.backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad), n
    # Plain graph in eval mode: collapsed ratios r = 1/D, so eq. 17 is eq. 5 divided by D (docs/hrkd-method.md).
    torch.testing.assert_close(build(kd_world, "hrkd")(db)[0], la / 2, rtol=1e-5, atol=1e-6)
    # With the skip term the graph is not collapsed and each ablation computes something else.
    losses = {m: build(kd_world, m, graph_skip=True)(db)[0].item()
              for m in ("hrkd", "no-self-attention", "no-comp-agg", "no-hierarchical")}
    assert len({round(v, 7) for v in losses.values()}) == 4, losses
    assert all(abs(v - la.item()) > 1e-4 for v in losses.values())
    g = build(kd_world, "no-comp-agg").graph
    assert len(g.aggregators) == 2 and g.aggregators[0].weight is None and len(g.references) == 0
    assert build(kd_world, "no-self-attention").graph.references[0].weight is None
    assert len(build(kd_world, "no-hierarchical").graph.aggregators) == 0


# -- graph training -----------------------------------------------------------------------------------


def _one_step(obj, db):
    opt = torch.optim.AdamW(param_groups(obj, 0.0), lr=1e-2)
    before = {n: p.detach().clone() for n, p in obj.graph.named_parameters()}
    loss, _ = obj(db)
    loss.backward()
    opt.step()
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    return before, in_opt


def test_trainable_graph_gets_gradients_and_moves(kd_world):
    obj = build(kd_world, "hrkd", graph_skip=True)
    before, in_opt = _one_step(obj, step_batch(toy_task()))
    graph = dict(obj.graph.named_parameters())
    assert all(id(p) in in_opt for p in graph.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in graph.values())
    assert any(not torch.equal(before[n], p) for n, p in graph.items())


def test_frozen_graph_is_not_optimised_but_r_still_carries_gradient(kd_world):
    db = step_batch(toy_task())
    obj = build(kd_world, "hrkd", ratios="frozen")
    before, in_opt = _one_step(obj, db)
    for n, p in obj.graph.named_parameters():
        assert not p.requires_grad and p.grad is None and id(p) not in in_opt and torch.equal(before[n], p), n
    student = [p for p in obj.student.parameters()]
    assert all(id(p) in in_opt for p in student)

    # Gradient through r: the student's gradient changes when r is detached. (graph_skip: the plain
    # graph's collapsed ratios have an exactly-zero gradient, which would hide the difference.)
    def grads(detach: bool):
        o = build(kd_world, "hrkd", ratios="frozen", graph_skip=True)
        if detach:
            real = o.relational
            o.relational = lambda *args, **kw: type(real(*args, **kw))(real(*args, **kw).ratios.detach(), [], None)
        o(db)[0].backward()
        return torch.cat([p.grad.flatten() for p in o.student.encoder.parameters() if p.grad is not None])

    g_through, g_detached = grads(False), grads(True)
    assert (g_through - g_detached).abs().max() > 1e-6


# -- teachers -------------------------------------------------------------------------------------------


def test_teachers_are_frozen_and_outside_the_objective(kd_world):
    obj = build(kd_world, "hrkd")
    obj.train()
    teacher_params = {id(p) for g in obj.teachers for p in g.model.parameters()}
    assert teacher_params and not teacher_params & {id(p) for p in obj.parameters()}
    assert all(k.split(".")[0] in {"student", "proj", "graph"} for k in obj.state_dict())
    assert all(k.split(".")[0] in {"student", "graph"} for k in obj.snapshot_state())
    assert all(not g.model.training for g in obj.teachers)  # objective.train() leaves teachers in eval
    loss, _ = obj(step_batch(toy_task()))
    loss.backward()
    for g in obj.teachers:
        assert all(not p.requires_grad and p.grad is None for p in g.model.parameters())
    n = sum(p.numel() for p in obj.parameters())
    assert n == sum(p.numel() for m in (obj.student, obj.proj, obj.graph) for p in m.parameters())


# -- batches, errors, ratios -------------------------------------------------------------------------------


def test_make_distill_batch_local_ids_and_missing_domain():
    task = toy_task()
    db = make_distill_batch(task, "train", [(1, torch.tensor([0, 2, 3]))], (1,))
    assert db.spans == ((0, 3),) and db.batch.domain_ids.tolist() == [0, 0, 0]  # task domain 1 -> local 0
    with pytest.raises(HRKDError, match="no rows of domain"):
        make_distill_batch(task, "train", [(0, torch.tensor([0])), (1, torch.tensor([], dtype=torch.long))], (0, 1))


def test_teacher_checkpoint_errors(kd_world, tmp_path):
    with pytest.raises(HRKDError, match=r"run `dvc repro train_teacher@toy-mix` first"):
        teacher_checkpoints(tmp_path / "nope", "toy", "mix", DOMAINS, "per-domain")
    with pytest.raises(HRKDError, match="'single' teacher kind"):
        teacher_checkpoints(kd_world["teachers"], "toy", "single", DOMAINS, "shared")
    with pytest.raises(HRKDError, match="unknown distillation method"):
        KDObjective(MultiDomainBert.from_pretrained(kd_world["student"], 2, None), None, num_domains=1,
                    method="hrdk", distill=Distill(), teacher_layers=4, teacher_hidden=48)


def test_relational_ratios_of_objective_are_eval_mode_and_normalised(kd_world):
    obj = build(kd_world, "hrkd").train()
    task = toy_task()
    batches = {d: collate(task, "dev", [(i, torch.arange(3))]) for i, d in enumerate(DOMAINS)}
    out = relational_ratios(obj, batches)
    assert obj.training and obj.graph.training  # modes restored
    assert out["domains"] == DOMAINS and out["ratios"].shape == (S_LAYERS + 1, 2)
    torch.testing.assert_close(out["ratios"].sum(1), torch.ones(S_LAYERS + 1))
    assert [tuple(s.shape) for s in out["similarity"]] == [(2, m + 1) for m in range(S_LAYERS + 1)]
    again = relational_ratios(obj, list(batches.values()))
    assert torch.equal(out["ratios"], again["ratios"])  # dropout off: deterministic
    db = concat_domain_batches(list(batches.values()))
    obj.eval()
    with torch.no_grad():
        direct = obj.relational(db, obj.student_outputs(db)).ratios
    torch.testing.assert_close(out["ratios"], direct)


def test_ratio_logs_match_diagnostics():
    r = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]])
    logs = ratio_logs(r)
    diag = ratio_diagnostics(r)
    assert logs["ratio_spread"].item() == pytest.approx(diag["mean_spread"], abs=1e-6)
    assert logs["ratio_entropy"].item() == pytest.approx(diag["mean_normalised_entropy"], abs=1e-6)
    # by hand: spreads 0.3, 0, 1; normalised entropies H([.5,.3,.2])/ln3, 1, 0
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)) / math.log(3)
    assert logs["ratio_spread"].item() == pytest.approx(1.3 / 3, abs=1e-6)
    assert logs["ratio_entropy"].item() == pytest.approx((h + 1) / 3, abs=1e-6)


def test_projected_prototypes_average_the_projections_and_survive_a_reload(kd_world, tmp_path):
    task = toy_task()
    db = step_batch(task)
    obj = build(kd_world, "hrkd", graph_skip=True, prototype_features="projected")
    assert obj.graph_args["feature_dim"] == 48 and obj.graph.feature_dim == 48  # the teacher's width
    with torch.no_grad():
        so = obj.student_outputs(db)
        protos = obj.prototypes(db, so)
        a, z = db.spans[1]
        # by hand: layer 1 of domain 1 = mean over rows and positions of W_1^hidn H_1 (padding included)
        want = obj.proj[1](so.hidden_states[0][a:z]).mean(dim=(0, 1))
        assert torch.allclose(protos[1, 1], want, atol=1e-6)
        assert torch.allclose(protos[0, 0], obj.proj[0](so.embeddings[:db.spans[0][1]]).mean(dim=(0, 1)), atol=1e-6)
        raw = build(kd_world, "hrkd", graph_skip=True)
        assert raw.prototypes(db, so).shape[-1] == 32  # the paper: the student's own width
    batches = [collate(task, "dev", [(d, torch.arange(3))]) for d in range(2)]
    live = relational_ratios(obj, batches)["ratios"]
    from hrkd.distill.ratios import save_relational
    save_relational(obj, tmp_path / "rel", kd_world["tok"], {"domains": DOMAINS})
    assert (tmp_path / "rel" / "projections.pt").is_file()
    assert torch.allclose(relational_ratios(tmp_path / "rel", batches)["ratios"], live, atol=1e-6)


def test_only_dro_trains_its_graph_at_a_scaled_learning_rate(kd_world):
    """distill.dro_graph_lr_scale reaches the optimiser through KDObjective.lr_scales."""
    from hrkd.engine import param_groups

    dro = build(kd_world, "hrkd-dro")
    assert dro.lr_scales == {"graph.": 0.1} and build(kd_world, "hrkd").lr_scales == {}
    graph = {id(p) for p in dro.graph.parameters()}
    groups = param_groups(dro, 0.01, 1e-3)
    scaled = [p for g in groups if g.get("lr") == 1e-3 * 0.1 for p in g["params"]]
    assert {id(p) for p in scaled} == graph
