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
