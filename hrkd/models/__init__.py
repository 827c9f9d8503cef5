"""BERT encoders with distillation taps, per-domain heads and plain-transformers checkpoints.

Importing this package registers nothing with ``transformers``; the tapping attention function
is registered on first use (see :func:`hrkd.models.attention.ensure_registered`).
"""

from hrkd.models.checkpoint import load_domain_classifiers, save_domain_classifier
from hrkd.models.encoder import EncoderOutput, MultiDomainBert, Taps
from hrkd.models.pretrained import load_encoder, load_tokenizer

__all__ = [
    "EncoderOutput",
    "MultiDomainBert",
    "Taps",
    "load_domain_classifiers",
    "load_encoder",
    "load_tokenizer",
    "save_domain_classifier",
]
