"""Shared fixtures (the toy section itself is built in toy_sections.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

from toy_sections import make_toy_section  # noqa: E402


@pytest.fixture
def toy_section():
    return make_toy_section()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one intra-op thread for the rest of the module, then back: on several threads the CPU kernels do not
    always sum in the same order (two identical training runs can differ in the last bits), so a test comparing
    training runs bit for bit pins one, whatever ``OMP_NUM_THREADS`` or an earlier test left."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
