"""The ``pretrained`` stage: teacher and student encoders (+ tokenizer) on disk, so later stages run offline.

Demo profile: a WordPiece vocabulary trained on the prepared corpus and tiny randomly initialised
BERTs. Paper profile: ``bert-base-uncased`` and TinyBERT (or any local/hub BERT-family checkpoint)
fetched once and re-saved with ``save_pretrained``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from hrkd.config import BertShape, Params
from hrkd.errors import HRKDError
from hrkd.io import atomic_dir, write_json

log = logging.getLogger(__name__)

DEMO = "demo"
ROLES = ("teacher", "student")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, as in BERT's vocab order
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------- loading real checkpoints
def _load_error(source: str, err: BaseException, setting: str | None) -> HRKDError:
    where = "the hub (offline?)" if not Path(source).expanduser().exists() else "its directory"
    fix = f"set {setting} to a local directory" if setting else "pass a local save_pretrained directory"
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    log.debug("loading %s failed: %s", source, detail)
    return HRKDError(f"could not load '{source}' from {where}: download it where there is internet, or {fix}")


def _looks_local(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else path-like is meant as a directory."""
    return Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") > 1 or "\\" in source


def load_encoder_config(source: str | os.PathLike, revision: str | None = None, setting: str | None = None):
    """The checkpoint's config; old BERT checkpoints without ``model_type`` (TinyBERT) read as BERT."""
    from transformers import AutoConfig, BertConfig, PretrainedConfig

    source = str(source)
    local = Path(source).expanduser()
    if not local.exists() and _looks_local(source):
        # Checked here: the hub client would otherwise retry a path as a repo id for ~30 s offline.
        raise HRKDError(f"checkpoint directory {source} not found: run `dvc repro pretrained` or fix {setting or 'the path'}")
    if local.exists() and not (local / "config.json").is_file():
        raise HRKDError(f"{source} has no config.json: point {setting or 'it'} to a save_pretrained directory")
    try:
        raw, _ = PretrainedConfig.get_config_dict(source, revision=revision)
    except (OSError, ValueError) as err:
        raise _load_error(source, err, setting) from None
    if "model_type" in raw:
        return AutoConfig.from_pretrained(source, revision=revision)
    # TinyBERT's general-distillation config predates model_type and carries extra keys
    # (fit_size, cell, structure); BertConfig keeps them as inert attributes.
    log.info("%s has no model_type in its config: reading it as a BERT config", source)
    return BertConfig.from_dict(raw)


def load_encoder(source: str | os.PathLike, revision: str | None = None, setting: str | None = None):
    """A BERT-family encoder (with pooler) from a hub id or a local directory, as it is saved."""
    return load_encoder_checked(source, revision, setting)[0]


def load_encoder_checked(source: str | os.PathLike, revision: str | None = None, setting: str | None = None,
                         layers: int | None = None, seed: int | None = None):
    """A BERT-family encoder (with pooler) from a hub id or a local directory.

    ``layers`` keeps the embeddings and the first ``layers`` encoder layers (a DistilBERT-style
    truncation). Weights the encoder does not have (TinyBERT's ``fit_denses``, MLM heads, cut
    layers) are dropped; weights it lacks (a pooler that sentence-transformers checkpoints leave
    out) start random from ``seed``, so the same params give the same bytes on every machine.
    Returns ``(model, missing_keys)``.
    """
    from transformers import AutoModel

    source = str(source)
    config = load_encoder_config(source, revision, setting)
    depth = int(config.num_hidden_layers)
    if layers is not None:
        if layers > depth:
            raise HRKDError(f"{source} has {depth} layers, fewer than the {layers} asked for: "
                            f"set {(setting or 'the model').replace('_model', '_layers')} to at most {depth}")
        config.num_hidden_layers = layers
    try:
        # fork_rng: seeding here must not move the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model, info = AutoModel.from_pretrained(source, config=config, revision=revision, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise _load_error(source, err, setting) from None
    if layers is not None and layers < depth:
        log.info("%s: kept the embeddings and the first %d of its %d layers", source, layers, depth)
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not _in_cut_layer(k, layers))
    if unexpected:
        log.info("%s: ignored %d weights the encoder has no use for (e.g. %s)", source, len(unexpected), unexpected[0])
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        log.warning("%s: %d encoder weights were not in the checkpoint and start random from seed %s (e.g. %s)",
                    source, len(missing), seed, missing[0])
    return model, missing


def _in_cut_layer(key: str, layers: int | None) -> bool:
    """A weight of an encoder layer that a truncation to ``layers`` left out (expected, not news)."""
    if layers is None:
        return False
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layer" and parts[i + 1].isdigit():
            return int(parts[i + 1]) >= layers
    return False


def load_tokenizer(source: str | os.PathLike, revision: str | None = None, setting: str | None = None):
    """The checkpoint's tokenizer; a bare ``vocab.txt`` (old BERT checkpoints) is read as BERT's."""
    from transformers import AutoTokenizer, BertTokenizerFast

    source = str(source)
    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise HRKDError(f"tokenizer directory {source} not found: run `dvc repro pretrained` or fix {setting or 'the path'}")
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError, KeyError, TypeError) as first:
        try:
            return BertTokenizerFast.from_pretrained(source, revision=revision)
        except (OSError, ValueError, KeyError, TypeError):
            raise _load_error(source, first, setting) from None


# ---------------------------------------------------------------------- demo profile
def collect_corpus(data_dir: Path, tasks: Sequence[str]) -> list[str]:
    """Every ``text``/``text_pair`` of every prepared train split, sorted for a deterministic vocabulary."""
    import pandas as pd

    texts: list[str] = []
    for task in tasks:
        task_dir = Path(data_dir) / task
        if not task_dir.is_dir():
            raise HRKDError(f"{task_dir} not found: run `dvc repro prepare` first (the demo vocabulary is built from it)")
        files = sorted(task_dir.glob("*/train.parquet"))
        if not files:
            raise HRKDError(f"{task_dir} has no <domain>/train.parquet: re-run `dvc repro prepare`")
        for path in files:
            frame = pd.read_parquet(path)
            for column in ("text", "text_pair"):
                if column in frame:
                    texts.extend(str(t) for t in frame[column].dropna())
    return sorted(texts)


def train_wordpiece(texts: Sequence[str], vocab_size: int, max_seq_len: int):
    """A lowercase BERT WordPiece tokenizer trained on ``texts``, as a ``BertTokenizerFast``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    if not texts:
        raise HRKDError("the prepared train splits contain no text: check data/prepared and re-run `dvc repro prepare`")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # Same normaliser and pre-tokeniser as BertTokenizerFast, so the vocabulary fits how it splits text.
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # tokenizers' trainer assigns ids to the "##x" continuation pieces in hash-map order, and merge
    # ties are broken by id, so the vocabulary changes from run to run (huggingface/tokenizers#1794).
    # Seeding those pieces, sorted, right after the special tokens fixes their ids and makes the
    # result deterministic. Their special status stays inside this throw-away trainer tokenizer:
    # only the vocabulary is kept below.
    seeds = list(SPECIAL_TOKENS) + [f"##{c}" for c in _continuation_chars(tok, texts)]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=seeds, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    vocab = dict(sorted(tok.get_vocab().items(), key=lambda item: item[1]))
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=max_seq_len)


def _continuation_chars(tok, texts: Sequence[str]) -> list[str]:
    """Sorted characters that occur after the first position of a pre-tokenised word."""
    chars: set[str] = set()
    for text in texts:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            chars.update(word[1:])
    return sorted(chars)


def build_demo_encoder(shape: BertShape, vocab_size: int, max_seq_len: int, seed: int, pad_token_id: int = 0):
    """A randomly initialised BertModel of ``shape``, reproducible from ``seed``."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=max_seq_len,
        pad_token_id=pad_token_id,
    )
    # fork_rng: building a model must not shift the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(config)


# ---------------------------------------------------------------------- the stage
def build_pretrained(params: Params, data_dir: Path, out_dir: Path) -> dict:
    """Create ``out_dir/{teacher,student}`` and ``out_dir/manifest.json``; return the manifest."""
    profile = params.active
    sources = {"teacher": profile.teacher_model, "student": profile.student_model}
    revision = profile.model_revision
    demo_tokenizer = None
    if DEMO in sources.values():
        texts = collect_corpus(Path(data_dir), params.tasks)
        demo_tokenizer = train_wordpiece(texts, params.models.vocab_size, profile.max_seq_len)
        log.info("trained a %d-token WordPiece vocabulary on %d texts", len(demo_tokenizer), len(texts))

    built, missing = {}, {}
    for i, (role, source) in enumerate(sources.items()):
        # Separate seeds so resizing the teacher leaves the student's initialisation unchanged.
        if source == DEMO:
            shape: BertShape = getattr(params.models, role)
            model = build_demo_encoder(
                shape, len(demo_tokenizer), profile.max_seq_len, params.models.seed + i, demo_tokenizer.pad_token_id
            )
            tokenizer = demo_tokenizer
        else:
            setting = f"profiles.{params.profile}.{role}_model"
            log.info("loading the %s from %s (revision %s)", role, source, revision or "default")
            model, missing[role] = load_encoder_checked(source, revision, setting, layers=getattr(profile, f"{role}_layers"),
                                                        seed=params.models.seed + i)
            tokenizer = load_tokenizer(source, revision, setting)
        built[role] = (model, tokenizer)
    _check_compatible(built, profile.max_seq_len)

    manifest = {"profile": params.profile, "max_seq_len": profile.max_seq_len}
    for role, (model, tokenizer) in built.items():
        cfg = model.config
        manifest[role] = {
            "source": sources[role],
            "revision": None if sources[role] == DEMO else revision,
            "model_type": cfg.model_type,
            "vocab_size": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()),
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "intermediate_size": cfg.intermediate_size,
            "layers_kept": getattr(profile, f"{role}_layers"),
            # Weights the checkpoint lacked, initialised from models.seed + role index.
            "seeded_weights": missing.get(role, []),
        }
    with atomic_dir(out_dir) as tmp:
        for role, (model, tokenizer) in built.items():
            model.save_pretrained(tmp / role)
            tokenizer.save_pretrained(tmp / role)
        write_json(tmp / MANIFEST, manifest)
    for role in ROLES:
        log.info("%s: %s, %d parameters", role, manifest[role]["source"], manifest[role]["parameters"])
    return manifest


def _check_compatible(built: dict, max_seq_len: int) -> None:
    """Distillation feeds the same input ids to both models and pairs attention heads one to one."""
    (teacher, t_tok), (student, s_tok) = built["teacher"], built["student"]
    if t_tok.get_vocab() != s_tok.get_vocab():
        raise HRKDError(
            "teacher and student tokenizers differ: distillation feeds both the same input ids; "
            "pick a student that shares the teacher's vocabulary"
        )
    t_heads, s_heads = teacher.config.num_attention_heads, student.config.num_attention_heads
    if t_heads != s_heads:
        raise HRKDError(
            f"teacher has {t_heads} attention heads but the student {s_heads}: attention distillation (eq. 3) "
            "pairs heads one to one; pick models with the same head count"
        )
    for role, (model, _) in built.items():
        if model.config.max_position_embeddings < max_seq_len:
            raise HRKDError(
                f"the {role} supports {model.config.max_position_embeddings} positions, fewer than max_seq_len "
                f"{max_seq_len}: lower profiles.<profile>.max_seq_len"
            )
