"""The documentation's relative links resolve: the README, docs/ and the results' pages move
text between them (docs/history.md keeps what the README said before), and a link to a file or
heading that moved away would send a reader nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"#{1,6} (.*)")


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens and underscores
    dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """A page's heading anchors (a repeated heading's get -1, -2, ...), code blocks skipped."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        match = None if in_code else HEADING.match(line)
        if match:
            anchor = heading_anchor(match.group(1))
            repeats = seen.get(anchor, 0)
            seen[anchor] = repeats + 1
            found.add(anchor if repeats == 0 else f"{anchor}-{repeats}")
    return found


def pages() -> list[Path]:
    return sorted(
        [
            REPO / "README.md",
            *(REPO / "docs").glob("*.md"),
            *(REPO / "evaluation").rglob("*.md"),
            *(REPO / "bench" / "results").rglob("*.md"),
        ]
    )


def broken_links(page: Path) -> list[str]:
    """The page's relative links whose file or heading does not exist."""
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target}: no such heading")
    return broken


def test_heading_anchor_follows_github() -> None:
    assert heading_anchor("Speed: service vs bare model") == "speed-service-vs-bare-model"
    assert heading_anchor("The demo bundle (`python -m bench.demo_accuracy`)") == (
        "the-demo-bundle-python--m-benchdemo_accuracy"
    )


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# A heading\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading) [gone](missing.md) [no heading](other.md#not-a-heading) "
        "[web](https://example.org/x#y)\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#not-a-heading: no such heading",
    ]


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []
