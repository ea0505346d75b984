"""Markdown pages as GitHub renders them: the anchors their headings get."""

from __future__ import annotations

import re
from pathlib import Path

FENCED = re.compile(r"^[ \t]*```.*?^[ \t]*```[^\n]*$", flags=re.S | re.M)


def slug(heading: str) -> str:
    """A heading's anchor by GitHub's rules: the rendered text in lower case, every character
    but letters, digits, `_`, `-` and spaces dropped, each space a `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; GitHub suffixes a repeated one `-1`, `-2`, …."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCED.sub("", page.read_text()), flags=re.M):
        base = slug(heading)
        repeats = seen.get(base, 0)
        seen[base] = repeats + 1
        found.add(base if repeats == 0 else f"{base}-{repeats}")
    return found
