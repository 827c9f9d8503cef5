"""The pretrained stage: demo vocabulary + tiny BERTs, local/hub checkpoints, TinyBERT-style configs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

from hrkd.config import parse_params
from hrkd.errors import HRKDError
from hrkd.io import read_json
from hrkd.models import MultiDomainBert
from hrkd.models.pretrained import build_pretrained, load_encoder, load_tokenizer
from helpers import tree_bytes

REPO = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta river stone light quiet movie kitchen phone travel story".split()


def raw_params(teacher: str = "demo", student: str = "demo", profile: str = "demo") -> dict:
    return {
        "profile": profile,
        "tasks": ["mnli", "amazon"],
        "data": {
            "mnli": {"kind": "mnli", "domains": ["fiction", "travel"]},
            "amazon": {"kind": "amazon", "domains": ["books", "dvd"], "counts": {"books": [1, 1, 1], "dvd": [1, 1, 1]}},
        },
        "models": {
            "vocab_size": 90,
            "seed": 0,
            "teacher": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
            "student": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
        },
        "profiles": {profile: {"max_seq_len": 24, "teacher_model": teacher, "student_model": student}},
    }


def sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + ("." if i % 2 else "!")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    for task, domains, pair in (("mnli", ["fiction", "travel"], True), ("amazon", ["books", "dvd"], False)):
        for d, domain in enumerate(domains):
            (root / task / domain).mkdir(parents=True)
            rows = range(d * 20, d * 20 + 20)
            pd.DataFrame({
                "uid": [f"{domain}-{i}" for i in rows],
                "text": [sentence(i, 5).title() for i in rows],  # title case: the vocabulary must be lowercase
                "text_pair": [sentence(i + 3, 4) if pair else None for i in rows],
                "label": [i % 2 for i in rows],
            }).to_parquet(root / task / domain / "train.parquet", index=False)
    return root


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_build_is_deterministic_and_usable(tmp_path, prepared):
    params = parse_params(raw_params())
    first = build_pretrained(params, prepared, tmp_path / "a")
    build_pretrained(params, prepared, tmp_path / "b")
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # nothing half-written left

    out = tmp_path / "a"
    manifest = read_json(out / "manifest.json")
    assert manifest == first and manifest["profile"] == "demo"
    teacher, student = BertModel.from_pretrained(out / "teacher"), BertModel.from_pretrained(out / "student")
    assert (teacher.config.hidden_size, teacher.config.num_hidden_layers) == (32, 2)
    assert (student.config.hidden_size, student.config.num_hidden_layers) == (16, 1)
    assert manifest["student"]["parameters"] == sum(p.numel() for p in student.parameters())
    assert manifest["teacher"]["source"] == "demo" and manifest["teacher"]["revision"] is None
    for model in (teacher, student):
        assert model.config.max_position_embeddings >= 24 and model.pooler is not None

    tok_t, tok_s = AutoTokenizer.from_pretrained(out / "teacher"), AutoTokenizer.from_pretrained(out / "student")
    assert tok_t.get_vocab() == tok_s.get_vocab()
    vocab = tok_t.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert len(vocab) == manifest["teacher"]["vocab_size"] <= 90
    ids = tok_t("River Stone", "quiet movie")["input_ids"]
    assert tok_t.unk_token_id not in ids and ids[0] == tok_t.cls_token_id
    assert tok_t.convert_ids_to_tokens(ids)[1] == "river"  # lowercased
    assert teacher.config.vocab_size == len(vocab) and teacher.config.pad_token_id == 0

    model = MultiDomainBert.from_pretrained(out / "student", num_labels=3, domains=["fiction", "travel"])
    enc = tok_s(["alpha beta", "gamma"], padding=True, return_tensors="pt")
    assert model(enc["input_ids"], enc["attention_mask"], domain=1).logits.shape == (2, 3)


def test_demo_seed_changes_weights(tmp_path, prepared):
    raw = raw_params()
    build_pretrained(parse_params(raw), prepared, tmp_path / "a")
    raw["models"]["seed"] = 1
    build_pretrained(parse_params(raw), prepared, tmp_path / "b")
    a, b = file_digests(tmp_path / "a"), file_digests(tmp_path / "b")
    assert a["teacher/model.safetensors"] != b["teacher/model.safetensors"]
    assert a["teacher/tokenizer.json"] == b["teacher/tokenizer.json"]


def test_missing_prepared_data_asks_for_prepare(tmp_path):
    with pytest.raises(HRKDError) as err:
        build_pretrained(parse_params(raw_params()), tmp_path / "nothing", tmp_path / "out")
    assert "dvc repro prepare" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tinybert_like(tmp_path_factory) -> tuple[Path, dict]:
    """An old-style checkpoint: no model_type, extra config keys, bert.-prefixed and extra weights."""
    root = tmp_path_factory.mktemp("tinybert")
    torch.manual_seed(2)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    state = {f"bert.{k}": v.clone() for k, v in BertModel(config).state_dict().items()}
    state["fit_denses.0.weight"] = torch.randn(24, 16)  # TinyBERT's projection to the teacher width
    state["fit_denses.0.bias"] = torch.zeros(24)
    torch.save(state, root / "pytorch_model.bin")
    raw = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version", "architectures")}
    raw.update(fit_size=24, cell={}, structure=[], pre_trained="")
    (root / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return root, state


def test_tinybert_style_checkpoint_loads_as_bert(tinybert_like):
    path, state = tinybert_like
    model = load_encoder(path)  # a Path works as well as a str
    assert type(model).__name__ == "BertModel" and model.config.fit_size == 24
    loaded = model.state_dict()
    for key, value in state.items():
        if key.startswith("bert."):
            assert torch.equal(loaded[key.removeprefix("bert.")], value), key
    tok = load_tokenizer(path)
    assert tok.convert_ids_to_tokens(tok("Alpha river")["input_ids"]) == ["[CLS]", "alpha", "river", "[SEP]"]


def test_local_checkpoints_are_copied(tmp_path, tinybert_like):
    path, _ = tinybert_like
    params = parse_params(raw_params(str(path), str(path), profile="paper"))
    manifest = build_pretrained(params, tmp_path / "unused", tmp_path / "out")
    assert manifest["student"]["source"] == str(path) and manifest["student"]["num_hidden_layers"] == 2
    reloaded = BertModel.from_pretrained(tmp_path / "out" / "student")
    torch.testing.assert_close(reloaded.state_dict(), load_encoder(str(path)).state_dict(), atol=0, rtol=0)
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path / "out" / "teacher"), BertTokenizerFast)


def test_mismatched_vocabularies_are_refused(tmp_path, prepared, tinybert_like):
    path, _ = tinybert_like
    with pytest.raises(HRKDError) as err:  # demo teacher vocabulary vs the checkpoint's vocab.txt
        build_pretrained(parse_params(raw_params("demo", str(path))), prepared, tmp_path / "out")
    assert "tokenizers differ" in str(err.value) and not (tmp_path / "out").exists()


def test_unreachable_hub_model_gives_one_line_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the hub client fail at once instead of retrying for half a minute.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    params = parse_params(raw_params("no-such-org/no-such-bert", "no-such-org/no-such-bert", profile="paper"))
    with pytest.raises(HRKDError) as err:
        build_pretrained(params, tmp_path, tmp_path / "out")
    message = str(err.value)
    assert message.startswith("could not load 'no-such-org/no-such-bert' from the hub (offline?)")
    assert "profiles.paper.teacher_model" in message and "\n" not in message


def test_missing_local_directory(tmp_path):
    with pytest.raises(HRKDError, match="not found"):
        load_encoder(str(tmp_path / "gone"), setting="profiles.paper.student_model")
    with pytest.raises(HRKDError, match="not found"):
        load_tokenizer(tmp_path / "gone")


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params()), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "pretrained.py"), "--params", str(tmp_path / "params.yaml"),
         "--data", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "dvc repro prepare" in result.stderr


@pytest.fixture(scope="module")
def poolerless(tmp_path_factory) -> Path:
    """A modern 3-layer checkpoint without pooler weights, as sentence-transformers ships them."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("poolerless")
    torch.manual_seed(5)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32)
    state = {k: v.contiguous() for k, v in BertModel(config).state_dict().items() if not k.startswith("pooler.")}
    save_file(state, root / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(root)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return root


def test_weights_a_checkpoint_lacks_start_from_models_seed(tmp_path, poolerless):
    raw = raw_params(str(poolerless), str(poolerless), profile="paper")
    first = build_pretrained(parse_params(raw), tmp_path / "unused", tmp_path / "a")
    build_pretrained(parse_params(raw), tmp_path / "unused", tmp_path / "b")
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")  # byte-identical, pooler included
    assert first["teacher"]["seeded_weights"] == first["student"]["seeded_weights"] == [
        "pooler.dense.bias", "pooler.dense.weight"]
    teacher = BertModel.from_pretrained(tmp_path / "a" / "teacher").state_dict()
    student = BertModel.from_pretrained(tmp_path / "a" / "student").state_dict()
    assert not teacher["pooler.dense.weight"].equal(student["pooler.dense.weight"])  # seed + role index
    raw["models"]["seed"] = 3
    build_pretrained(parse_params(raw), tmp_path / "unused", tmp_path / "c")
    other = BertModel.from_pretrained(tmp_path / "c" / "teacher").state_dict()
    assert {k for k in teacher if not teacher[k].equal(other[k])} == {"pooler.dense.weight"}  # the bias starts at 0


def test_student_layers_keep_the_first_k_layers(tmp_path, poolerless):
    from safetensors.torch import load_file

    raw = raw_params(str(poolerless), str(poolerless), profile="paper")
    raw["profiles"]["paper"]["student_layers"] = 2
    manifest = build_pretrained(parse_params(raw), tmp_path / "unused", tmp_path / "out")
    assert (manifest["teacher"]["num_hidden_layers"], manifest["student"]["num_hidden_layers"]) == (3, 2)
    assert manifest["student"]["layers_kept"] == 2 and manifest["teacher"]["layers_kept"] is None
    original = load_file(poolerless / "model.safetensors")
    student = BertModel.from_pretrained(tmp_path / "out" / "student").state_dict()
    kept = [k for k in original if "layer.2." not in k]
    assert kept and all(student[k].equal(original[k]) for k in kept)
    assert not any("layer.2." in k for k in student)


def test_more_layers_than_the_checkpoint_has_is_one_line_error(tmp_path, poolerless):
    raw = raw_params(str(poolerless), str(poolerless), profile="paper")
    raw["profiles"]["paper"]["student_layers"] = 5
    with pytest.raises(HRKDError, match=r"has 3 layers, fewer than the 5 asked for: set profiles.paper.student_layers to at most 3"):
        build_pretrained(parse_params(raw), tmp_path / "unused", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layers_of_a_demo_model_are_refused():
    raw = raw_params()
    raw["profiles"]["demo"]["student_layers"] = 1
    with pytest.raises(HRKDError, match=r"student_layers cuts a real checkpoint.*models.student.num_hidden_layers"):
        parse_params(raw)


def test_small_profile_is_a_profile():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = parse_params({**raw, "profile": "small"})
    assert params.active.student_layers == 3 and params.active.teacher_model == params.active.student_model
