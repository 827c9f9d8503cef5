"""Per-domain classifier export: plain transformers (and its pipeline) reproduce our predictions."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

from hrkd.errors import HRKDError
from hrkd.io import read_json
from hrkd.models import MultiDomainBert, load_domain_classifiers, save_domain_classifier

WORDS = "the a cat dog sat on mat good bad film book plot great awful was is not very fun dull".split()
LABELS = ["entailment", "neutral", "contradiction"]
TEXTS = ["the cat sat on the mat", "a very good film", "the plot was not fun , awful", "dull book"]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *WORDS])}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32,
    )
    path = tmp_path_factory.mktemp("enc")
    BertModel(config).save_pretrained(path)
    m = MultiDomainBert.from_pretrained(path, num_labels=3, domains=["fiction", "travel"])
    for head in m.heads:  # distinct non-zero biases, so a wrong or dropped head changes predictions
        torch.nn.init.normal_(head.bias, std=2.0)
    return m


def our_logits(model, tokenizer, domain: int) -> torch.Tensor:
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], domain=domain).logits


def test_saved_domain_loads_in_plain_transformers(tmp_path, model, tokenizer):
    meta = {"domain": "travel", "task": "mnli", "method": "hrkd", "seed": 1}
    rng = torch.get_rng_state()
    out = save_domain_classifier(model, 1, tmp_path / "travel", tokenizer, LABELS, meta)
    assert torch.equal(rng, torch.get_rng_state())  # saving mid-training must not shift the RNG stream
    assert sorted(p.name for p in tmp_path.iterdir()) == ["travel"]  # no temp dirs left behind
    assert read_json(out / "hrkd.json") == meta

    clf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(clf).__name__ == "BertForSequenceClassification"
    assert clf.config.id2label == dict(enumerate(LABELS)) and clf.config.label2id["neutral"] == 1
    enc = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = clf(**enc).logits
    ours = our_logits(model, tokenizer, 1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, our_logits(model, tokenizer, 0))  # the export picked head 1, not 0

    pipe = transformers.pipeline("text-classification", model=str(out), device="cpu")
    predicted = pipe(TEXTS)
    probs = ours.softmax(-1)
    assert [p["label"] for p in predicted] == [LABELS[i] for i in ours.argmax(-1).tolist()]
    for p, row in zip(predicted, probs):
        assert p["score"] == pytest.approx(row.max().item(), abs=1e-5)


def test_reload_round_trip(tmp_path, model, tokenizer):
    paths = {}
    for index, domain in enumerate(model.domains):
        paths[domain] = save_domain_classifier(model, index, tmp_path / domain, tokenizer, LABELS, {"domain": domain})
    loaded = load_domain_classifiers(paths)
    assert list(loaded) == ["fiction", "travel"]
    for index, domain in enumerate(model.domains):
        assert loaded[domain].domains is None and loaded[domain].metadata == {"domain": domain}
        torch.testing.assert_close(our_logits(loaded[domain], tokenizer, None), our_logits(model, tokenizer, index), atol=1e-6, rtol=0)


def test_save_replaces_previous_directory(tmp_path, model, tokenizer):
    target = tmp_path / "fiction"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_domain_classifier(model, 0, target, tokenizer, LABELS, {})
    assert not (target / "stale.txt").exists() and (target / "config.json").is_file()


@pytest.mark.parametrize(
    "head, labels, needle",
    [(0, ["yes", "no"], "2 labels given"), (5, LABELS, "out of range"), (0, ["a", "a", "b"], "distinct")],
)
def test_bad_save_input_raises_one_line(tmp_path, model, tokenizer, head, labels, needle):
    with pytest.raises(HRKDError) as err:
        save_domain_classifier(model, head, tmp_path / "x", tokenizer, labels, {})
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()


def test_saved_tokenizer_does_not_depend_on_its_last_call(tmp_path, tokenizer):
    """A stage that tokenised its rows and one that read them from the token cache save the same
    tokenizer.json: truncating at the run's max_seq_len, no padding, whatever the last call set."""
    import copy
    import json

    from hrkd.models.checkpoint import save_tokenizer

    fresh, used = copy.deepcopy(tokenizer), copy.deepcopy(tokenizer)
    used(["a b c"] * 2, padding="max_length", max_length=7, truncation=True)
    save_tokenizer(fresh, tmp_path / "fresh", 12)
    save_tokenizer(used, tmp_path / "used", 12)
    saved = (tmp_path / "fresh" / "tokenizer.json").read_bytes()
    assert saved == (tmp_path / "used" / "tokenizer.json").read_bytes()
    spec = json.loads(saved)
    assert spec["truncation"]["max_length"] == 12 and spec["padding"] is None
