"""engine.teacher_precision: which CPUs get a bf16 teacher, and that it keeps the losses within tolerance.

The tolerance is docs/speed.md's (measured with benchmarks/bench_precision.py on the real
checkpoint): every loss term of eqs. 1-4 within TERM_TOL of its fp32-teacher value, the summed
loss within LOSS_TOL, and the student's gradient at cosine >= GRAD_COS with the fp32 one. The
student, its weights and the loss arithmetic stay fp32.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hrkd.config import Distill, Engine
from hrkd.data.loading import Batch
from hrkd.distill.batches import concat_domain_batches
from hrkd.distill.objective import KDObjective
from hrkd.distill.teacher_models import TeacherGroup
from hrkd.engine import Runtime, cpu_has_bf16, setup_runtime
from hrkd.errors import HRKDError

CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "models" / "all-MiniLM-L6-v2"
TERM_TOL = 5e-3
LOSS_TOL = 2e-3
GRAD_COS = 0.9999

REVIEWS = [
    ["A gripping story with characters I cared about.", "The plot dragged and the ending was a letdown.",
     "I could not put this book down; read it in two nights.", "Poorly edited, full of typos and repetition."],
    ["The picture quality of this DVD is superb.", "Disc arrived scratched and skips in the second half.",
     "Great extras, and the commentary track is worth it alone.", "Boring film, I turned it off after an hour."],
    ["Battery lasts all day and it charges quickly.", "Stopped working after two weeks, support was useless.",
     "Sound is clear and the pairing took seconds.", "The cable is flimsy and the plug broke off."],
    ["This pan heats evenly and cleans up in a minute.", "The blender leaks from the base every time.",
     "Sharp knives that hold their edge for months.", "Handle got loose and the coating peeled off."],
]


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse avx512f {flags}\n\nprocessor\t: 1\n")
    return path


def test_cpu_bf16_units_read_from_the_flags(tmp_path):
    assert cpu_has_bf16(_cpuinfo(tmp_path, "avx512_bf16 avx512_vnni"))
    assert cpu_has_bf16(_cpuinfo(tmp_path, "amx_tile amx_bf16"))
    # AVX-512 alone emulates bf16 (slower than fp32), and a flag must match whole, not as a prefix.
    assert not cpu_has_bf16(_cpuinfo(tmp_path, "avx512bw avx512_bf16x"))
    assert not cpu_has_bf16(tmp_path / "missing")


@pytest.mark.parametrize("has_bf16, want", [(True, torch.bfloat16), (False, None)])
def test_auto_teacher_precision_on_cpu(monkeypatch, has_bf16, want):
    monkeypatch.setattr("hrkd.engine.cpu_has_bf16", lambda: has_bf16)
    rt = setup_runtime(Engine(device="cpu"))
    assert rt.amp_dtype is None  # the student's step stays fp32 on every CPU
    assert rt.teacher_amp_dtype is want
    assert setup_runtime(Engine(device="cpu", teacher_precision="fp32")).teacher_amp_dtype is None
    assert setup_runtime(Engine(device="cpu", teacher_precision="bf16")).teacher_amp_dtype is torch.bfloat16


def test_fp16_teacher_on_cpu_is_a_one_line_error():
    with pytest.raises(HRKDError, match="engine.teacher_precision=fp16 needs a CUDA GPU"):
        setup_runtime(Engine(device="cpu", teacher_precision="fp16"))


def test_fp32_teacher_leaves_the_steps_autocast():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype is torch.bfloat16
        with Runtime(device=torch.device("cpu")).teacher_autocast():
            assert (a @ b).dtype is torch.float32
    with Runtime(device=torch.device("cpu"), teacher_amp_dtype=torch.bfloat16).teacher_autocast():
        assert (a @ b).dtype is torch.bfloat16


@pytest.fixture(scope="module")
def real_objective():
    if not CHECKPOINT.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real checkpoint missing at {CHECKPOINT}: CI must run the precision tolerance test")
        pytest.skip(f"real checkpoint missing at {CHECKPOINT}")
    from hrkd.models import MultiDomainBert
    from hrkd.models.pretrained import load_encoder_checked, load_tokenizer

    tok = load_tokenizer(CHECKPOINT)
    names = ["books", "dvd", "electronics", "kitchen"]
    torch.manual_seed(0)
    teacher = MultiDomainBert(load_encoder_checked(str(CHECKPOINT), seed=1)[0], num_labels=2, domains=names)
    student = MultiDomainBert(load_encoder_checked(str(CHECKPOINT), layers=3, seed=0)[0], num_labels=2, domains=names)
    group = TeacherGroup(teacher.eval().requires_grad_(False), tuple(range(4)), torch.arange(4))
    obj = KDObjective(student, [group], num_domains=4, method="hrkd", distill=Distill(), teacher_layers=6,
                      teacher_hidden=384).eval()
    parts = []
    for d, texts in enumerate(REVIEWS):
        enc = tok(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        parts.append(Batch(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                           torch.tensor([1, 0, 1, 0]), torch.full((4,), d)))
    return obj, concat_domain_batches(parts)


def _run(obj: KDObjective, db, teacher_dtype):
    obj.teacher_autocast = Runtime(device=torch.device("cpu"), teacher_amp_dtype=teacher_dtype).teacher_autocast
    obj.zero_grad(set_to_none=True)
    views = obj.teacher_outputs(db)
    s_out = obj.student_outputs(db)
    terms = obj.domain_losses(db, s_out, views)
    loss, _ = obj(db)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in obj.student.parameters() if p.grad is not None]).double()
    return views, s_out, terms, loss, grad


@pytest.mark.slow
def test_bf16_teacher_keeps_the_losses_within_tolerance(real_objective, one_thread):
    obj, db = real_objective
    _, _, ref, ref_loss, ref_grad = _run(obj, db, None)
    views, s_out, terms, loss, grad = _run(obj, db, torch.bfloat16)
    assert views[0].scores(6).dtype is torch.bfloat16  # it ran in bf16 (LayerNorm outputs stay fp32 under autocast)
    assert s_out.attention_scores[1].dtype is torch.float32 and s_out.logits.dtype is torch.float32  # the student is not
    assert all(p.dtype is torch.float32 for p in obj.parameters() if p.requires_grad)
    assert loss.dtype is torch.float32
    # The embedding layer has no matmul and ends in a LayerNorm: its output is fp32 either way.
    assert torch.equal(terms.embd, ref.embd)
    for name in ("attn", "hidn", "pred"):
        a, b = getattr(ref, name), getattr(terms, name)
        assert b.dtype is torch.float32
        rel = ((b - a).abs() / a.abs()).max().item()
        assert 0 < rel <= TERM_TOL, f"L_{name}: bf16 teacher moved it by {rel:.2e} (tolerance {TERM_TOL})"
    assert abs(loss.item() - ref_loss.item()) <= LOSS_TOL * abs(ref_loss.item())
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) >= GRAD_COS


@pytest.fixture(scope="module")
def real_metakd(real_objective):
    """Meta-KD's joint objective (every term: L_hid, L_att, L_TKD, L_pred and the lambda weights)
    on the same real rows: a one-head meta-teacher with its domain branch, a 3-layer student."""
    from hrkd.metakd.distill import MetaDistillObjective, MetaTeacher
    from hrkd.metakd.teacher import DomainBranch, MetaBatch
    from hrkd.models import MultiDomainBert
    from hrkd.models.pretrained import load_encoder_checked

    _, db = real_objective
    torch.manual_seed(0)
    model = MultiDomainBert(load_encoder_checked(str(CHECKPOINT), seed=1)[0], num_labels=2).eval().requires_grad_(False)
    branch = DomainBranch(384, 4).eval().requires_grad_(False)
    student = MultiDomainBert(load_encoder_checked(str(CHECKPOINT), layers=3, seed=0)[0], num_labels=2)
    obj = MetaDistillObjective(student, MetaTeacher(model, branch, mask_padding=False), stage="joint",
                               num_domains=4).eval()
    weights = torch.linspace(0.1, 0.9, len(db.batch.labels))
    return obj, MetaBatch(db.batch, weights)


@pytest.mark.slow
def test_bf16_teacher_keeps_the_metakd_losses_within_tolerance(real_metakd, one_thread):
    obj, mb = real_metakd
    runs = {}
    for dtype in (None, torch.bfloat16):
        obj.teacher_autocast = Runtime(device=torch.device("cpu"), teacher_amp_dtype=dtype).teacher_autocast
        obj.zero_grad(set_to_none=True)
        loss, logs = obj(mb)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in obj.parameters() if p.grad is not None]).double()
        runs[dtype] = (loss, logs, grad)
    (ref_loss, ref, ref_grad), (loss, logs, grad) = runs[None], runs[torch.bfloat16]
    assert loss.dtype is torch.float32 and all(p.dtype is torch.float32 for p in obj.parameters())
    for name in ("hid", "att", "tkd", "pred", "lambda"):
        a, b = ref[name], logs[name]
        assert b.dtype is torch.float32, name
        rel = ((b - a).abs() / a.abs()).item()
        assert 0 < rel <= TERM_TOL, f"{name}: bf16 teacher moved it by {rel:.2e} (tolerance {TERM_TOL})"
    assert abs(loss.item() - ref_loss.item()) <= LOSS_TOL * abs(ref_loss.item())
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) >= GRAD_COS
