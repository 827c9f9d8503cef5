"""Data preparation: sources (MNLI, Amazon Reviews, custom files, demo corpus) -> one on-disk format.

Import the submodules directly (``hrkd.data.format``, ``hrkd.data.prepare``...); this package
imports nothing itself so that reading a prepared split never pulls in the HF ``datasets`` stack.
"""
