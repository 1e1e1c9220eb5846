"""README.md and docs/*.md: every relative link reaches a file (and heading), every `make X` is a Makefile target."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~)")
_MAKE = re.compile(r"(?:^|[\s;&|(])make\s+(?:-C\s+\S+\s+)?([a-z][a-z0-9_-]*)")
_INLINE_CODE = re.compile(r"`([^`]+)`")
_TARGET = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)\s*:(?!=)", re.MULTILINE)


def _code(text: str) -> list[str]:
    """Inline code spans and the lines of fenced code blocks: where a command like `make demo` can appear."""
    segments, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
        elif fenced:
            segments.append(line)
        else:
            segments += _INLINE_CODE.findall(line)
    return segments


def _make_mentions(text: str) -> list[str]:
    return [target for segment in _code(text) for target in _MAKE.findall(segment)]


def _prose(text: str) -> str:
    """The text outside fenced code blocks (links inside code blocks are not links)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return "\n".join(lines)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(markdown: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in _prose(markdown.read_text()).splitlines() if line.startswith("#")}


def _relative_links(doc: Path) -> list[str]:
    links = _LINK.findall(_prose(doc.read_text()))
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]  # http:, https:, mailto: ...


def test_docs_are_found() -> None:
    assert REPO / "README.md" in DOCS and len(DOCS) >= 5


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file_and_heading(doc: Path) -> None:
    broken = []
    for link in _relative_links(doc):
        path_part, _, anchor = link.partition("#")
        target = (doc.parent / path_part).resolve() if path_part else doc
        if not target.exists():
            broken.append(f"{link}: {target} does not exist")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading '#{anchor}' in {target.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


def test_link_checker_sees_links_and_rejects_a_missing_file(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Top\nsee [a](missing.md), [b](doc.md#top) and ![c](img/x.png)\n```\n[not](a-link.md)\n```\n"
                   "[web](https://example.com)\n")
    assert _relative_links(doc) == ["missing.md", "doc.md#top", "img/x.png"]
    assert _anchors(doc) == {"top"}


def test_make_mentions_are_commands_in_code_not_prose() -> None:
    text = "Run `make demo`, then:\n```bash\nsudo make install-systemd  # note\ncd x && make test\n```\nmake sure to make it"
    assert _make_mentions(text) == ["demo", "install-systemd", "test"]


def _make_targets() -> set[str]:
    return set(_TARGET.findall((REPO / "Makefile").read_text()))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_make_command_mentioned_is_a_makefile_target(doc: Path) -> None:
    targets = _make_targets()
    mentioned = set(_make_mentions(doc.read_text()))
    assert mentioned - targets == set(), f"{doc.name} mentions make targets the Makefile lacks"


def test_readme_starts_with_make_demo_and_make_test() -> None:
    mentioned = _make_mentions((REPO / "README.md").read_text())
    assert mentioned[:2] == ["demo", "test"], mentioned[:5]
    assert {"demo", "test"} <= _make_targets()
