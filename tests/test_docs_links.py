"""Every relative link in the docs resolves: the file or folder exists, and an anchor names a heading.

Covers README.md, PROTOCOL.md, bench/README.md and docs/*.md. Links to web addresses are not checked.
Anchors follow GitHub's rule: the heading lower-cased, punctuation dropped, spaces made hyphens.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(
    [ROOT / "README.md", ROOT / "PROTOCOL.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")]
)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        if match := HEADING.match(line):
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    text = "\n".join(CODE_SPAN.sub("", line) for line in prose_lines(path.read_text(encoding="utf-8")))
    return LINK.findall(text)


def local(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)


def test_the_docs_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "PROTOCOL.md", "bench/README.md", "docs/results.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(doc: Path) -> None:
    broken = []
    for target in filter(local, links(doc)):
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / unquote(file_part)).resolve() if file_part else doc
        shown = resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved
        if not resolved.exists():
            broken.append(f"{target}: no {shown}")
        elif anchor and resolved.suffix == ".md" and unquote(anchor).lower() not in anchors(resolved):
            broken.append(f"{target}: no heading for #{anchor} in {shown}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_parser_sees_what_a_reader_sees(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# A `code` heading: here\n[a](x.md) [`b`](y/#z) ![c](img.png) `[not](code.md)` [w](https://e.org)\n"
        "```\n[fenced](f.md)\n```\n"
    )
    assert links(doc) == ["x.md", "y/#z", "img.png", "https://e.org"]
    assert anchors(doc) == {"a-code-heading-here"}
