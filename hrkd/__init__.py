"""HRKD: hierarchical relational knowledge distillation for cross-domain BERT compression."""

__version__ = "0.1.0"
