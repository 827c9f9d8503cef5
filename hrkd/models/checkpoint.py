"""Trained models on disk: one plain ``*ForSequenceClassification`` directory per domain.

A multi-domain model is exported as the shared encoder plus ONE domain's head, so each directory
works with any ``transformers`` tool (``pipeline("text-classification", model=dir)``) with no
``hrkd`` code, and serving a domain never loads the other domains' heads.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch

from hrkd.errors import HRKDError
from hrkd.io import atomic_dir, write_json
from hrkd.models.encoder import METADATA_FILE, MultiDomainBert

log = logging.getLogger(__name__)


def save_domain_classifier(
    model: MultiDomainBert,
    head_index: int,
    out_dir: str | Path,
    tokenizer,
    labels: Sequence[str],
    metadata: dict,
) -> Path:
    """Write encoder + head ``head_index`` as a classifier directory (config, weights, tokenizer, hrkd.json).

    The directory appears atomically: an interrupted save leaves the previous one intact.
    """
    from transformers import AutoModelForSequenceClassification

    labels = [str(label) for label in labels]
    if len(labels) != model.num_labels:
        raise HRKDError(f"{len(labels)} labels given for a model with {model.num_labels} outputs: pass the task's label list")
    if len(set(labels)) != len(labels):
        raise HRKDError(f"labels must be distinct (got {labels}); fix the task's label list")
    head = model.heads[model.domain_index(int(head_index))]

    config = copy.deepcopy(model.config)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.classifier_dropout = model.dropout.p
    config.architectures = None  # filled in by save_pretrained from the class actually saved
    # fork_rng: the classifier's throw-away random init must not shift a training run's RNG
    # stream, or saving a checkpoint mid-run would change the rest of the run.
    with torch.random.fork_rng(devices=[]):
        clf = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    clf.base_model.load_state_dict(model.encoder.state_dict())
    if not isinstance(getattr(clf, "classifier", None), torch.nn.Linear):
        raise HRKDError(f"{type(clf).__name__} has no single linear classifier; use a BERT-family encoder")
    clf.classifier.load_state_dict(head.state_dict())

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        clf.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp, metadata.get("max_seq_len"))
        write_json(tmp / METADATA_FILE, metadata)
    log.info("saved %s (head %d) to %s", type(clf).__name__, head_index, out_dir)
    return out_dir


def save_tokenizer(tokenizer, folder: str | Path, max_seq_len: int | None) -> None:
    """Save ``tokenizer`` as it tokenised the training rows: truncating at ``max_seq_len``, no padding.

    A fast tokenizer's ``tokenizer.json`` otherwise records whatever its last call left (nothing at
    all when the stage read its splits from the token cache), so one run could write two different
    folders; fixed, an inference ``pipeline`` on the folder also truncates as training did.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        if max_seq_len:
            backend.enable_truncation(int(max_seq_len))
        else:
            backend.no_truncation()
    tokenizer.save_pretrained(folder)


def load_domain_classifiers(paths: Mapping[str, str | Path]) -> dict[str, MultiDomainBert]:
    """Load per-domain classifier directories, each as a single-head :class:`MultiDomainBert`."""
    return {domain: MultiDomainBert.from_classifier(path) for domain, path in paths.items()}
