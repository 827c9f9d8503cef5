"""Meta-KD end to end on a tiny demo task: scores stage, meta-teacher, meta-distillation objective and runs."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml

from hrkd.config import MetaKDTeacher, TrainSettings, parse_params
from hrkd.data.loading import collate, load_task
from hrkd.registry import run_name
from hrkd.engine import Runtime
from hrkd.errors import HRKDError
from hrkd.io import read_json
from hrkd.metakd.distill import MetaDistillObjective, distill_metakd, load_meta_teacher, metakd_settings
from hrkd.metakd.scores import SCORES_FILE, SUMMARY_FILE, compute_scores, load_scores
from hrkd.metakd.teacher import (DomainBranch, MetaBatch, MetaTeacherObjective, load_branch, make_meta_batch,
                                 train_meta_teacher)
from hrkd.models import MultiDomainBert, Taps
from hrkd.driver import RunPaths
from helpers import stop_at

REPO = Path(__file__).resolve().parents[1]
CPU = Runtime(device=torch.device("cpu"))
TEACHER = TrainSettings(epochs=2, batch_size=8, lr=3e-3, eval_every=3, eval_batch_size=16)


def metakd_params(**top):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tasks"] = ["amazon"]
    raw["fewshot"]["tasks"] = []
    raw["demo"]["amazon"] = {"train": 48, "dev": 12, "test": 12}
    raw["models"].update(vocab_size=200, teacher={"hidden_size": 16, "num_hidden_layers": 2,
                                                  "num_attention_heads": 2, "intermediate_size": 32},
                         student={"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "intermediate_size": 16})
    raw["engine"].update(device="cpu", progress=False, log_every=1)
    demo = raw["profiles"]["demo"]
    demo["max_seq_len"] = 24
    demo["metakd_stage_a"] = {"epochs": 1, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0,
                              "lr_schedule": "constant", "eval_every": 4, "eval_batch_size": 16}
    demo["metakd_stage_b"] = {"epochs": 1, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.1, "eval_every": 2,
                              "eval_batch_size": 16}
    for key, value in top.items():
        if key.startswith("metakd."):
            raw["metakd"]["distill"][key.split(".", 1)[1]] = value
        elif key.startswith("stage_b."):
            demo["metakd_stage_b"][key.split(".", 1)[1]] = value
        else:
            raw[key] = value
    return parse_params(raw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prepared demo data, tiny pretrained encoders, the scores stage's output and a trained meta-teacher."""
    from hrkd.data.prepare import prepare_task
    from hrkd.models import load_encoder, load_tokenizer
    from hrkd.models.pretrained import build_pretrained

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("metakd")
    params = metakd_params()
    data = root / "data" / "amazon"
    prepare_task(params, "amazon", data)
    build_pretrained(params, root / "data", root / "pretrained")
    tok = load_tokenizer(root / "pretrained" / "teacher")
    task = load_task(data, tok, params.active.max_seq_len)
    encoder = load_encoder(root / "pretrained" / "teacher")
    compute_scores(task=task, data_dir=data, encoder=encoder, settings=params.metakd.scores, device=CPU.device,
                   out_dir=root / "scores", provenance={"encoder": "tiny"})
    scores = load_scores(root / "scores", data, task)
    paths = RunPaths(out=root / "teacher" / "meta", metrics=root / "teacher.json", live=root / "live",
                     resume=root / "resume")
    metrics = train_meta_teacher(task=task, params=params, pretrained=root / "pretrained" / "teacher",
                                 tokenizer=tok, runtime=CPU, paths=paths, settings=TEACHER, scores=scores)
    return {"root": root, "params": params, "data": data, "tok": tok, "task": task, "encoder": encoder,
            "scores": scores, "teacher": paths.out, "teacher_metrics": metrics}


# -- scores stage ------------------------------------------------------------------------------------


def test_scores_stage_output_summary_lookup_and_determinism(world, tmp_path):
    root, task = world["root"], world["task"]
    frame = pd.read_parquet(root / "scores" / SCORES_FILE)
    assert list(frame.columns) == ["uid", "domain", "row", "label", "t"]
    assert len(frame) == sum(task.sizes("train"))
    summary = read_json(root / "scores" / SUMMARY_FILE)
    assert summary["variant"] == "paper" and set(summary["domains"]) == set(task.domains)
    for d, name in enumerate(task.domains):
        own = frame[frame["domain"] == name]
        assert summary["domains"][name]["n"] == len(own)
        assert summary["domains"][name]["mean"] == pytest.approx(own["t"].mean(), abs=1e-5)
        # load_scores: row r of domain d is the parquet's (domain, row) entry
        torch.testing.assert_close(world["scores"][d], torch.tensor(own.sort_values("row")["t"].to_numpy()))
    # A rerun writes identical bytes (DVC sees no change).
    compute_scores(task=task, data_dir=world["data"], encoder=world["encoder"], settings=world["params"].metakd.scores,
                   device=CPU.device, out_dir=tmp_path / "again", provenance={"encoder": "tiny"})
    assert (tmp_path / "again" / SCORES_FILE).read_bytes() == (root / "scores" / SCORES_FILE).read_bytes()
    # The code variant gives other scores.
    code = world["params"].metakd.scores.model_copy(update={"variant": "code"})
    compute_scores(task=task, data_dir=world["data"], encoder=world["encoder"], settings=code, device=CPU.device,
                   out_dir=tmp_path / "code", provenance={})
    assert not pd.read_parquet(tmp_path / "code" / SCORES_FILE)["t"].equals(frame["t"])


def test_load_scores_detects_a_stale_cache(world, tmp_path):
    frame = pd.read_parquet(world["root"] / "scores" / SCORES_FILE)
    frame.loc[0, "uid"] = "not-a-row"
    (tmp_path / "stale").mkdir()
    frame.to_parquet(tmp_path / "stale" / SCORES_FILE)
    with pytest.raises(HRKDError, match=r"no score for 1 .*metakd_scores@amazon"):
        load_scores(tmp_path / "stale", world["data"], world["task"])
    with pytest.raises(HRKDError, match="not found"):
        load_scores(tmp_path / "missing", world["data"], world["task"])


# -- meta-teacher --------------------------------------------------------------------------------------


def test_meta_batch_carries_each_rows_score(world):
    scores, task = world["scores"], world["task"]
    step = [(2, torch.tensor([5, 0, 7])), (0, torch.tensor([3, 1]))]
    mb = make_meta_batch(task, "train", step, scores)
    expected = [scores[d][int(i)].item() for d, idx in step for i in idx]  # row by row, by hand
    assert mb.weights.tolist() == pytest.approx(expected)
    assert mb.batch.domain_ids.tolist() == [2, 2, 2, 0, 0]


def teacher_objective(world, **settings):
    torch.manual_seed(0)
    model = MultiDomainBert.from_pretrained(world["root"] / "pretrained" / "teacher", num_labels=2, domains=None)
    return MetaTeacherObjective(model, world["task"].domains, MetaKDTeacher(**settings), world["scores"])


def test_meta_teacher_loss_by_hand_with_shuffled_domain_targets(world):
    obj = teacher_objective(world).eval()  # dropout off: only the permutation is random
    step = [(0, torch.arange(4)), (1, torch.arange(3)), (3, torch.arange(5))]
    mb = make_meta_batch(world["task"], "train", step, world["scores"])
    mb = MetaBatch(mb.batch, torch.linspace(0.2, 1.0, len(mb)))  # spread-out t to see the weighting
    torch.manual_seed(7)
    loss, logs = obj(mb)
    b = mb.batch
    with torch.no_grad():
        out = obj.model(b.input_ids, b.attention_mask, b.token_type_ids)
        hbar = out.last_hidden[:, 1:].mean(1)  # positions 1.., padding included
        br = obj.branch
        r = (hbar + br.embedding.weight[b.domain_ids]) @ br.transform.weight.T + br.transform.bias
        q = torch.tanh(r) @ br.classifier.weight.T + br.classifier.bias
        torch.manual_seed(7)
        shuffled = b.domain_ids[torch.randperm(len(b))]
        ce = F.cross_entropy(out.logits, b.labels, reduction="none")
        da = F.cross_entropy(q, shuffled, reduction="none")
        expected = (mb.weights * (ce + 0.5 * da)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["domain"], da.mean(), rtol=1e-5, atol=1e-6)
    assert sorted(shuffled.tolist()) == sorted(b.domain_ids.tolist())
    # gamma1 = 0 (the released Amazon script): the t-weighted CE alone.
    obj0 = teacher_objective(world, domain_loss_weight=0.0).eval()
    torch.testing.assert_close(obj0(mb)[0], (mb.weights * ce).mean(), rtol=1e-5, atol=1e-6)


def test_meta_teacher_gradients_reach_the_branch_and_the_encoder(world):
    obj = teacher_objective(world).train()
    mb = make_meta_batch(world["task"], "train", [(0, torch.arange(4)), (2, torch.arange(4))], world["scores"])
    obj(mb)[0].backward()
    br = obj.branch
    assert br.classifier.weight.grad.abs().sum() > 0 and br.transform.weight.grad.abs().sum() > 0
    assert br.embedding.weight.grad[[0, 2]].abs().sum() > 0 and br.embedding.weight.grad[[1, 3]].abs().sum() == 0
    assert obj.model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    with pytest.raises(HRKDError, match="metakd_scores"):
        MetaTeacherObjective(obj.model, world["task"].domains, MetaKDTeacher(), None)


def test_meta_teacher_run_writes_classifiers_with_their_domain_branch(world):
    metrics, out, task = world["teacher_metrics"], world["teacher"], world["task"]
    assert set(metrics["test"]) == {*task.domains, "average"}
    assert read_json(out / "teacher.json")["kind"] == "meta"
    for d in task.domains:
        assert read_json(out / d / "hrkd.json")["kind"] == "meta"
        clf = transformers.pipeline("text-classification", model=str(out / d), device="cpu")
        assert clf("a great book")[0]["label"] in task.labels
        branch, meta = load_branch(out / d)
        assert meta["domains"] == task.domains and branch.classifier is not None
        assert not any(p.requires_grad for p in branch.parameters())
    # Each domain's branch is the one of its own selected checkpoint.
    steps = {metrics["step"][d] for d in task.domains}
    states = [load_branch(out / d)[0].transform.weight for d in task.domains]
    assert len({tuple(s.flatten()[:4].tolist()) for s in states}) == len(steps)


def test_tkd_feature_is_wd_of_pooled_plus_domain_embedding_without_tanh():
    torch.manual_seed(0)
    br = DomainBranch(3, 2, dropout=0.0)
    h = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    d = torch.tensor([1, 0])
    e, w, b = br.embedding.weight, br.transform.weight, br.transform.bias
    expected = torch.stack([w @ (h[i] + e[d[i]]) + b for i in range(2)])
    torch.testing.assert_close(br.features(h, d), expected)
    r, q = br(h, d)
    torch.testing.assert_close(q, torch.tanh(expected) @ br.classifier.weight.T + br.classifier.bias)


# -- meta-distillation objective ------------------------------------------------------------------------


def distill_objective(world, stage, **kw):
    teacher = load_meta_teacher(world["teacher"] / "books", 2, world["task"].domains, CPU.device)
    torch.manual_seed(0)
    student = MultiDomainBert.from_pretrained(world["root"] / "pretrained" / "student", num_labels=2, domains=None)
    return MetaDistillObjective(student, teacher, stage=stage, num_domains=4, **kw).eval()


def books_batch(world, t):
    b = collate(world["task"], "train", [(0, torch.arange(len(t)))])
    return MetaBatch(b, torch.tensor(t))


def hand_terms(obj, mb):
    """Per-example L_hid, L_att, batch L_TKD and lambda, row by row with plain torch ops."""
    b = mb.batch
    s_model, t_model = obj.student, obj.teacher.model
    with torch.no_grad():
        s = s_model(b.input_ids, b.attention_mask, b.token_type_ids, taps=Taps.all(s_model.num_layers))
        t = t_model(b.input_ids, b.attention_mask, b.token_type_ids, taps=Taps.all(t_model.num_layers))
        W, bias = obj.proj.weight, obj.proj.bias
        layer_map = [2]  # 1 student layer, 2 teacher layers: uniform map
        assert obj.layer_map == layer_map
        s_levels = [s.embeddings, *s.hidden_states]
        t_levels = [t.embeddings] + [t.hidden_states[n - 1] for n in layer_map]
        hid, att, lam = [], [], []
        for i in range(len(b)):
            hid.append(sum(((x[i] @ W.T + bias - y[i]) ** 2).mean() for x, y in zip(s_levels, t_levels)))
            keys = b.attention_mask[i].bool()[None, None, :]
            att.append(sum((((s.attention_scores[m][i] - t.attention_scores[n][i]) * keys) ** 2).mean()
                           for m, n in zip([1], layer_map)))
            p = F.softmax(t.logits[i], -1)[b.labels[i]]
            lam.append((1 + mb.weights[i]) / (1 + math.exp((1 - p.item()) ** 2)))
        sb, tb = obj.branch, obj.teacher.branch
        r_s = (s.last_hidden[:, 1:].mean(1) + sb.embedding.weight[b.domain_ids]) @ sb.transform.weight.T \
            + sb.transform.bias
        r_t = (t.last_hidden[:, 1:].mean(1) + tb.embedding.weight[b.domain_ids]) @ tb.transform.weight.T \
            + tb.transform.bias
        tkd = ((r_s @ W.T + bias - r_t) ** 2).mean()
        pred = [-(F.softmax(t.logits[i], -1) * F.log_softmax(s.logits[i], -1)).sum() for i in range(len(b))]
    return torch.stack(hid), torch.stack(att), tkd, torch.tensor(lam), torch.stack(pred)


def test_stage_a_loss_weights_every_example_by_its_own_lambda(world):
    obj = distill_objective(world, "intermediate")
    mb = books_batch(world, [0.0, 1.0, 0.3, 0.9, 0.5])
    loss, logs = obj(mb)
    hid, att, tkd, lam, _ = hand_terms(obj, mb)
    per = hid + att + 0.5 * tkd
    expected = (lam * per).sum() / len(lam)
    torch.testing.assert_close(loss, expected, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(logs["lambda"], lam.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["tkd"], tkd, rtol=1e-5, atol=1e-6)
    # Not EasyNLP's mean(lambda) * batch loss. The toy rows' losses differ by ~1 %, so the gap is
    # small, but far (> 20x) outside the tolerance of the by-hand match above.
    assert lam.max() - lam.min() > 0.2
    easynlp = lam.mean() * per.mean()
    assert abs(loss.item() - easynlp.item()) > 20 * 2e-6 * loss.item()
    # gamma2 scales only the batch-level TKD term.
    obj2 = distill_objective(world, "intermediate", tkd_weight=2.0)
    obj2.load_state_dict(obj.state_dict())
    torch.testing.assert_close(obj2(mb)[0], (lam * (hid + att + 2.0 * tkd)).mean(), rtol=1e-5, atol=1e-6)


def test_joint_objective_adds_the_per_example_prediction_loss_inside_lambda(world):
    obj = distill_objective(world, "joint")
    mb = books_batch(world, [0.2, 0.9, 0.6])
    loss, logs = obj(mb)
    hid, att, tkd, lam, pred = hand_terms(obj, mb)
    torch.testing.assert_close(loss, (lam * (hid + att + 0.5 * tkd + pred)).mean(), rtol=1e-5, atol=1e-6)
    assert set(logs) == {"hid", "att", "tkd", "lambda", "pred"}


def test_stage_b_is_the_unweighted_soft_ce_and_trains_only_the_student(world):
    obj = distill_objective(world, "prediction")
    mb = books_batch(world, [0.0, 1.0, 0.5])
    loss, logs = obj(mb)
    _, _, _, _, pred = hand_terms(distill_objective(world, "intermediate"), mb)
    torch.testing.assert_close(loss, pred.mean(), rtol=1e-5, atol=1e-6)  # no lambda, no hard labels
    assert set(logs) == {"pred"}
    assert all(k.startswith("student.") for k in obj.state_dict())  # no W_f / branch in stage B


def test_teacher_is_frozen_and_outside_the_objective(world):
    obj = distill_objective(world, "intermediate").train()
    assert all(k.split(".")[0] in {"student", "proj", "branch"} for k in obj.state_dict())
    assert all(k.startswith("student.") for k in obj.snapshot_state())
    teacher_ids = {id(p) for p in obj.teacher.model.parameters()} | {id(p) for p in obj.teacher.branch.parameters()}
    assert not teacher_ids & {id(p) for p in obj.parameters()}
    assert not obj.teacher.model.training and not obj.teacher.branch.training
    obj(books_batch(world, [0.5, 0.5, 0.5]))[0].backward()
    assert all(p.grad is None for p in obj.teacher.model.parameters())
    assert obj.proj.weight.grad.abs().sum() > 0 and obj.branch.transform.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in obj.student.heads.parameters())  # stage A never touches the head


# -- runs -----------------------------------------------------------------------------------------------


def run(world, out: Path, p=None, stop_at_step=None, **kw):
    if stop_at_step is not None:
        kw["callbacks"] = [stop_at(stop_at_step)]
    paths = RunPaths(out=out / "model", metrics=out / "metrics.json", live=out / "live", resume=out / "resume")
    metrics = distill_metakd(task=world["task"], params=p or world["params"],
                              seed=1, teacher_dir=world["teacher"], pretrained_student=world["root"] / "pretrained" /
                              "student", tokenizer=world["tok"], runtime=CPU, paths=paths,
                              scores=kw.pop("scores", world["scores"]), **kw)
    return metrics, paths


@pytest.fixture(scope="module")
def two_runs(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("metakd-runs")
    p = metakd_params(lr=5e-4)
    return run(world, root / "a", p), run(world, root / "b", p)


def _tsv(path: Path) -> list[float]:
    return [float(line.split("\t")[-1]) for line in path.read_text().splitlines()[1:]]


@pytest.mark.slow
def test_metakd_run_writes_per_domain_students_metrics_and_both_stages(world, two_runs):
    (metrics, paths), _ = two_runs
    task = world["task"]
    assert set(metrics) == {"dev", "test", "step"} and set(metrics["test"]) == {*task.domains, "average"}
    assert read_json(paths.metrics) == metrics
    assert sorted(p.name for p in paths.out.iterdir()) == sorted([*task.domains, "student.json"])
    summary = read_json(paths.out / "student.json")
    assert summary["run"] == "metakd" and summary["teacher"] == "meta" and summary["schedule"] == "two-stage"
    assert summary["lr"] == 5e-4 and summary["stage_a"]["lr"] == 3e-3  # top-level lr -> stage B only
    for d in task.domains:
        meta = read_json(paths.out / d / "hrkd.json")
        assert meta["method"] == "metakd" and meta["domain"] == d and meta["settings"]["lr"] == 5e-4
        clf = transformers.pipeline("text-classification", model=str(paths.out / d), device="cpu")
        assert clf("an awful kettle")[0]["label"] in task.labels
        # The two stages really ran with their own losses and schedules.
        a, b = paths.live / d / "stage-a" / "plots" / "metrics" / "train", paths.live / d / "stage-b" / "plots" / "metrics" / "train"
        assert {f.stem for f in a.iterdir()} >= {"hid", "att", "tkd", "lambda", "lr"} and not (a / "pred.tsv").exists()
        assert (b / "pred.tsv").is_file() and not (b / "hid.tsv").exists()
        assert set(_tsv(a / "lr.tsv")) == {3e-3}  # stage A: constant rate
        lr_b = _tsv(b / "lr.tsv")
        assert max(lr_b) <= 5e-4 and lr_b[-1] < max(lr_b)  # stage B: the top-level lr, decaying
        assert not (paths.resume / d / "stage-a" / "student.pt").exists()  # dropped once the domain completed


@pytest.mark.slow
def test_metakd_run_is_deterministic(world, two_runs):
    (m1, p1), (m2, p2) = two_runs
    assert m1 == m2
    for d in world["task"].domains:
        assert (p1.out / d / "model.safetensors").read_bytes() == (p2.out / d / "model.safetensors").read_bytes()


def test_top_level_lr_overrides_stage_b_only():
    a, b = metakd_settings(metakd_params())
    assert b.lr == 3e-3 and a.lr == 3e-3 and a.lr_schedule == "constant"
    a2, b2 = metakd_settings(metakd_params(lr=5e-4))
    assert b2.lr == 5e-4 and a2 == a


@pytest.mark.slow
def test_joint_schedule_is_one_weighted_stage(world, tmp_path):
    metrics, paths = run(world, tmp_path, metakd_params(**{"metakd.schedule": "joint"}))
    live = paths.live / "books" / "plots" / "metrics" / "train"
    assert (live / "pred.tsv").is_file() and (live / "hid.tsv").is_file() and (live / "lambda.tsv").is_file()
    assert not (paths.live / "books" / "stage-a").exists()
    assert read_json(paths.out / "student.json")["stage_a"] is None


@pytest.mark.slow
def test_run_killed_in_stage_b_resumes_without_redoing_stage_a(world, tmp_path, caplog):
    p = metakd_params(**{"stage_b.epochs": 2})  # stage A: 6 steps per domain, stage B: 12
    full, _ = run(world, tmp_path / "full", p)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "run", p, stop_at_step=8)  # books: stage A done, stage B saved at step 8
    assert (tmp_path / "run" / "resume" / "books" / "stage-a" / "student.pt").is_file()
    assert not (tmp_path / "run" / "model").exists()
    with caplog.at_level(logging.INFO, logger="hrkd"):
        resumed, _ = run(world, tmp_path / "run", p)
    assert "stage A already complete" in caplog.text
    assert resumed == full


def test_metakd_errors(world, tmp_path):
    assert run_name("metakd", "meta") == "metakd"
    with pytest.raises(HRKDError, match="--teacher meta"):
        run_name("metakd", "mix")
    with pytest.raises(HRKDError, match=r"train_meta_teacher@amazon"):
        distill_metakd(task=world["task"], params=world["params"], seed=1, teacher_dir=tmp_path / "none",
                       pretrained_student=world["root"] / "pretrained" / "student", tokenizer=world["tok"],
                       runtime=CPU, paths=RunPaths(tmp_path / "o", tmp_path / "m.json", None, tmp_path / "r"),
                       scores=world["scores"])
    with pytest.raises(HRKDError, match="metakd_scores@amazon"):
        run(world, tmp_path, scores=None)
