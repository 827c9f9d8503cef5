"""MultiDomainBert: parity with transformers, taps, SDPA for untapped layers, domain routing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertModel

from hrkd.errors import HRKDError
from hrkd.models import MultiDomainBert, Taps
from hrkd.models.attention import ATTN_IMPLEMENTATION

LAYERS, HEADS, HIDDEN, VOCAB = 3, 4, 32, 60


def tiny_config(**kw) -> BertConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=32,
    )
    return BertConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    torch.manual_seed(0)
    clf = BertForSequenceClassification(tiny_config(num_labels=3))
    torch.nn.init.normal_(clf.classifier.bias)  # non-zero bias so a dropped bias would show
    path = tmp_path_factory.mktemp("clf")
    clf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("enc")
    BertModel(tiny_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return ids, mask, types


def test_logits_match_transformers_with_and_without_taps(classifier_dir, batch):
    ids, mask, types = batch
    ref = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    model = MultiDomainBert.from_classifier(classifier_dir)
    assert not model.training and model.domains is None and model.num_labels == 3
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, token_type_ids=types).logits
        plain = model(ids, mask, types)
        tapped = model(ids, mask, types, taps=Taps.all(LAYERS))
    assert plain.logits.shape == (4, 3)
    torch.testing.assert_close(plain.logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(tapped.logits, expected, atol=1e-5, rtol=0)
    assert plain.embeddings is None and plain.hidden_states is None and plain.attention_scores is None


def test_hidden_taps_equal_output_hidden_states(classifier_dir, batch):
    ids, mask, types = batch
    ref = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    model = MultiDomainBert.from_classifier(classifier_dir)
    with torch.no_grad():
        hf = ref(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True).hidden_states
        out = model(ids, mask, types, taps=Taps(hidden=True))
    assert len(out.hidden_states) == LAYERS and out.embeddings.shape == (4, 9, HIDDEN)
    torch.testing.assert_close(out.embeddings, hf[0], atol=1e-5, rtol=0)
    for ours, theirs in zip(out.hidden_states, hf[1:]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.last_hidden, hf[-1], atol=1e-5, rtol=0)
    assert out.attention_scores is None


def test_scores_are_unmasked_and_softmax_matches_eager_attentions(classifier_dir, batch):
    ids, mask, types = batch
    ref = AutoModelForSequenceClassification.from_pretrained(classifier_dir, attn_implementation="eager").eval()
    model = MultiDomainBert.from_classifier(classifier_dir)
    with torch.no_grad():
        probs = ref(ids, attention_mask=mask, token_type_ids=types, output_attentions=True).attentions
        out = model(ids, mask, types, taps=Taps(attention_layers=frozenset({1, 3})))
    assert sorted(out.attention_scores) == [1, 3]
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for layer, scores in out.attention_scores.items():
        assert scores.shape == (4, HEADS, 9, 9)
        torch.testing.assert_close(torch.softmax(scores + additive, dim=-1), probs[layer - 1], atol=1e-5, rtol=0)
    # Padded keys keep their raw QK^T value: no finfo.min or -10000 leaked into the scores.
    padded = out.attention_scores[1][2, :, :, 3:]
    assert padded.numel() > 0 and padded.abs().max() < 100


def test_untapped_layers_never_build_attention_maps(classifier_dir, batch, monkeypatch):
    ids, mask, types = batch
    model = MultiDomainBert.from_classifier(classifier_dir)
    seq = ids.shape[1]
    calls = {"sdpa": 0, "maps": 0}
    real_sdpa, real_matmul = torch.nn.functional.scaled_dot_product_attention, torch.matmul

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return real_sdpa(*args, **kwargs)

    def watching_matmul(a, b, *args, **kwargs):
        result = real_matmul(a, b, *args, **kwargs)
        if result.dim() == 4 and result.shape[-2:] == (seq, seq):
            calls["maps"] += 1
        return result

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(torch, "matmul", watching_matmul)
    with torch.no_grad():
        model(ids, mask, types, taps=Taps(hidden=True))
        assert calls == {"sdpa": LAYERS, "maps": 0}
        model(ids, mask, types, taps=Taps(attention_layers=frozenset({2})))
    assert calls == {"sdpa": 2 * LAYERS - 1, "maps": 1}
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION


def test_scores_carry_gradients_in_training(classifier_dir, batch):
    ids, mask, types = batch
    model = MultiDomainBert.from_classifier(classifier_dir).train()
    out = model(ids, mask, types, taps=Taps.all(LAYERS))
    out.attention_scores[2].pow(2).mean().backward()
    query = model.encoder.encoder.layer[1].attention.self.query.weight
    assert query.grad is not None and query.grad.abs().sum() > 0
    assert model.encoder.encoder.layer[2].attention.self.query.weight.grad is None


def test_per_row_domain_routing_equals_each_head(encoder_dir, batch):
    ids, mask, types = batch
    torch.manual_seed(5)
    model = MultiDomainBert.from_pretrained(encoder_dir, num_labels=2, domains=["a", "b", "c"])
    assert not model.training and len(model.heads) == 3
    domain = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        mixed = model(ids, mask, types, domain=domain)
        per_head = [model(ids, mask, types, domain=d).logits for d in range(3)]
        by_name = model(ids, mask, types, domain="c").logits
    expected = torch.stack([per_head[d][row] for row, d in enumerate(domain.tolist())])
    assert mixed.logits.shape == (4, 2)
    torch.testing.assert_close(mixed.logits, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(by_name, per_head[2], atol=0, rtol=0)
    assert not torch.allclose(per_head[0], per_head[1])  # heads really are distinct
    manual = model.heads[1](model.dropout(mixed.pooled))
    torch.testing.assert_close(per_head[1], manual, atol=0, rtol=0)


def test_heads_are_seeded_by_torch_rng(encoder_dir):
    torch.manual_seed(11)
    a = MultiDomainBert.from_pretrained(encoder_dir, num_labels=3, domains=["x", "y"])
    torch.manual_seed(11)
    b = MultiDomainBert.from_pretrained(encoder_dir, num_labels=3, domains=["x", "y"], dropout=0.3)
    torch.testing.assert_close(a.heads[1].weight, b.heads[1].weight, atol=0, rtol=0)
    assert a.dropout.p == pytest.approx(0.1) and b.dropout.p == pytest.approx(0.3)
    assert not torch.equal(a.heads[0].weight, a.heads[1].weight)


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda m, b: m(*b, domain="nowhere"), "unknown domain 'nowhere'"),
        (lambda m, b: m(*b, domain=7), "out of range"),
        (lambda m, b: m(*b), "pass domain="),
        (lambda m, b: m(*b, domain=torch.tensor([0, 1, 5, 0])), "0..2"),
        (lambda m, b: m(*b, domain=0, taps=Taps(attention_layers=frozenset({0}))), "use 1..3"),
        (lambda m, b: m(*b, domain=0, taps=Taps(attention_layers=frozenset({LAYERS + 1}))), "use 1..3"),
    ],
)
def test_bad_forward_input_raises_one_line(encoder_dir, batch, call, needle):
    model = MultiDomainBert.from_pretrained(encoder_dir, num_labels=2, domains=["a", "b", "c"])
    with pytest.raises(HRKDError) as err:
        call(model, batch)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_construction_raises_one_line(tmp_path, encoder_dir, classifier_dir):
    cases = [
        (lambda: MultiDomainBert.from_pretrained(tmp_path / "missing", 2, ["a"]), "not found"),
        (lambda: MultiDomainBert.from_pretrained(encoder_dir, 0, ["a"]), "num_labels"),
        (lambda: MultiDomainBert.from_pretrained(encoder_dir, 2, ["a", "a"]), "distinct"),
        (lambda: MultiDomainBert.from_classifier(tmp_path / "missing"), "no config.json"),
        (lambda: MultiDomainBert.from_classifier(classifier_dir, num_labels=2), "predicts 3 labels"),
    ]
    for make, needle in cases:
        with pytest.raises(HRKDError) as err:
            make()
        assert needle in str(err.value) and "\n" not in str(err.value)


def test_import_registers_nothing():
    code = (
        "import hrkd.models, hrkd.models.checkpoint, hrkd.models.pretrained\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        f"assert {ATTN_IMPLEMENTATION!r} not in AttentionInterface._global_mapping\n"
        f"assert {ATTN_IMPLEMENTATION!r} not in AttentionMaskInterface._global_mapping\n"
        "from hrkd.models.attention import ensure_registered\n"
        "assert ensure_registered() == ensure_registered()\n"
        f"assert {ATTN_IMPLEMENTATION!r} in AttentionInterface._global_mapping\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
