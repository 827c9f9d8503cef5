"""Builders and helpers shared by several test modules (not tests themselves); fixtures are in conftest.py."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from hrkd.config import Distill
from hrkd.data.loading import EncodedSplit, Schedule, TaskSplits
from hrkd.distill.batches import make_distill_batch
from hrkd.distill.objective import KDObjective
from hrkd.distill.teacher_models import load_teachers, teacher_checkpoints
from hrkd.models import MultiDomainBert, save_domain_classifier


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> contents): equal trees are byte-identical outputs."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def stop_at(step: int):
    """A Trainer callback that simulates a crash (a kill) once ``step`` optimiser steps are done."""

    def callback(trainer) -> None:
        if trainer.step >= step:
            raise KeyboardInterrupt(f"simulated interruption at step {trainer.step}")

    return callback


# -- a two-domain toy distillation world: tiny tokenizer, student and teacher encoders ------------

WORDS = "the a cat dog sat on mat good bad film book plot great awful was is not very fun dull".split()
LABELS = ["neg", "pos"]
DOMAINS = ["books", "dvd"]
HEADS = 4
S_LAYERS, T_LAYERS = 2, 4


def make_tokenizer() -> BertTokenizerFast:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *WORDS])}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=16)


def save_encoder(path: Path, hidden: int, layers: int, seed: int, vocab: int) -> Path:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=HEADS,
                     intermediate_size=2 * hidden, max_position_embeddings=16)
    BertModel(cfg).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def save_teacher(enc_dir: Path, out: Path, seed: int, tok, *, multi: bool = False) -> MultiDomainBert:
    torch.manual_seed(seed)
    model = MultiDomainBert.from_pretrained(enc_dir, num_labels=2, domains=DOMAINS if multi else None)
    for p in model.encoder.parameters():  # distinct teachers per seed, not just distinct heads
        p.data.add_(0.3 * torch.randn_like(p))
    for head in model.heads:
        torch.nn.init.normal_(head.weight, std=0.5)
        torch.nn.init.normal_(head.bias)
    if multi:
        for d, name in enumerate(DOMAINS):
            save_domain_classifier(model, d, out / "_shared" / name, tok, LABELS, {"seed": seed})
    else:
        save_domain_classifier(model, 0, out, tok, LABELS, {"seed": seed})
    return model


def toy_task(sizes=(10, 7), vocab=len(WORDS) + 6, length=8, seed=0) -> TaskSplits:
    g = torch.Generator().manual_seed(seed)
    splits = {}
    for d, n in zip(DOMAINS, sizes):
        splits[d] = {}
        for split, m in (("train", n), ("dev", 6), ("test", 6)):
            lengths = torch.randint(3, length + 1, (m,), generator=g, dtype=torch.int32)
            ids = torch.randint(5, vocab, (m, length), generator=g, dtype=torch.int32)
            ids[:, 0] = 2
            ids[torch.arange(length)[None, :] >= lengths[:, None]] = 0
            labels = (ids[:, 1] % 2).long()
            splits[d][split] = EncodedSplit(ids, torch.zeros_like(ids, dtype=torch.int8), lengths, labels)
    return TaskSplits(name="toy", labels=LABELS, domains=list(DOMAINS), splits=splits)


def build(world, method="multi-domain-kd", checkpoint="per-domain", seed=0, **distill_kw):
    distill = Distill(teacher_checkpoint=checkpoint, **distill_kw)
    domains = DOMAINS if method != "tinybert-kd" else DOMAINS[:1]
    paths = teacher_checkpoints(world["teachers"], "toy", "hrkd", domains, checkpoint)
    teachers = load_teachers(paths, 2, torch.device("cpu"))
    torch.manual_seed(seed)
    student = MultiDomainBert.from_pretrained(world["student"], num_labels=2,
                                              domains=None if method == "tinybert-kd" else DOMAINS)
    return KDObjective(student, teachers, num_domains=len(domains), method=method, distill=distill,
                       teacher_layers=T_LAYERS, teacher_hidden=48).eval()


def step_batch(task, domains=(0, 1)):
    sched = Schedule("parallel" if len(domains) > 1 else "single", tuple(task.sizes("train")), 4, seed=1,
                     domain=domains[0])
    return make_distill_batch(task, "train", sched.epoch(0)[0], domains)


def make_kd_world(root: Path) -> dict:
    """Tiny student encoder, per-domain teachers (distinct) and a shared multi-head teacher, on disk."""
    tok = make_tokenizer()
    student = save_encoder(root / "student", 32, S_LAYERS, 1, len(tok))
    tenc = save_encoder(root / "tenc", 48, T_LAYERS, 2, len(tok))
    kind = root / "teachers" / "toy" / "hrkd"
    for i, d in enumerate(DOMAINS):
        save_teacher(tenc, kind / d, 10 + i, tok)
    save_teacher(tenc, kind, 20, tok, multi=True)
    return {"root": root, "student": student, "teachers": kind, "tok": tok}
