"""Fixtures of the deployment tests (helpers.py holds the plain functions)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy.helpers import REPO, find_tool


@pytest.fixture
def tool() -> Callable[[str], str]:
    return find_tool


@pytest.fixture
def repo() -> Path:
    return REPO
