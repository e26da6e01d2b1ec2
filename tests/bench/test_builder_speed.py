"""``advguard bench builder_speed``: what it refuses before measuring."""

from pathlib import Path

import pytest

from app.core.errors import ConfigError
from bench.builder_speed import measure


def test_a_keep_bundle_path_holding_other_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    """The built bundle replaces --keep-bundle: it was rmtree'd whatever it held."""
    kept = tmp_path / "thesis"
    kept.mkdir()
    (kept / "chapter1.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not a bundle"):
        measure(tmp_path / "nowhere", None, "resnet20", tmp_path / "none.th", keep_bundle=kept)
    assert (kept / "chapter1.txt").read_text() == "mine"
