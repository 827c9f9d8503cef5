"""Fixtures shared by several test modules; plain builders are in helpers.py."""

from __future__ import annotations

import pytest
import torch

from fakepipe import faked_lock
from helpers import make_kd_world


@pytest.fixture(scope="module")
def kd_world(tmp_path_factory):
    """Tiny student encoder, per-domain teachers (distinct) and a shared multi-head teacher, on disk."""
    return make_kd_world(tmp_path_factory.mktemp("distill"))


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread, restoring the caller's setting.

    For tiny fits on a shared 2-core machine, intra-op threads only add contention (a relational
    graph fit: 0.35 s on one thread, several seconds on two under load).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """This project's pipeline with every output faked and dvc.lock committed (nothing trained)."""
    return faked_lock(tmp_path_factory.mktemp("dvcrepo"))
