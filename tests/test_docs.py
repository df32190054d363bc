"""`.venv/bin/python -m pytest -q -p no:cacheprovider tests/test_docs.py`: the README is the front door
and the docs/ pages hold the rest (fast tier, no models, no servers).

- README.md stays short (at most 250 lines);
- every relative link in README.md and docs/*.md points at a file that exists, and a `#anchor` on it is
  the GitHub slug of a heading in the target markdown file (so a section moved to another page, or a
  heading reworded, shows up here instead of as a link that lands at the top of a page);
- every docs/*.md page is linked from README.md (reachable from the front door).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!\\)\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SKIPPED_SCHEMES = ("http:", "https:", "mailto:")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, stripped, every character that is not a letter, digit,
    space, hyphen or underscore removed, each space a hyphen."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of a markdown file, fenced code blocks left out."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code (inline code spans keep their text out,
    link text in backticks included)."""
    found = []
    for number, line in prose_lines(path):
        text = CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), line)
        for match in LINK.finditer(text):
            found.append((number, match.group(2)))
    return found


def check_link(source: Path, target: str) -> str | None:
    """None when the link lands, else why not."""
    if target.lower().startswith(SKIPPED_SCHEMES):
        return None
    path_part, _, anchor = target.partition("#")
    dest = (source.parent / unquote(path_part)).resolve() if path_part else source
    if not dest.exists():
        return f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}"
    if anchor:
        if dest.suffix != ".md":
            return f"{target}: an anchor on a file that is not markdown"
        if anchor not in anchors(dest):
            return f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}"
    return None


def test_slug_follows_github():
    assert slug("Quality: does the preference stage help? (docs/results.md)") == (
        "quality-does-the-preference-stage-help-docsresultsmd")
    assert slug("Adding a ranker, a stage or an engine") == "adding-a-ranker-a-stage-or-an-engine"
    assert slug("  A real pretrained model: SmolLM2-135M ") == "a-real-pretrained-model-smollm2-135m"
    assert slug("`make demo` → DPO") == "make-demo--dpo"


def test_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; at most {MAX_README_LINES}: move text to docs/"


def test_every_relative_link_lands():
    pages = [README, *DOCS]
    checked, broken = 0, []
    for page in pages:
        for number, target in links(page):
            checked += 1
            problem = check_link(page, target)
            if problem:
                broken.append(f"{page.relative_to(ROOT)}:{number}: {problem}")
    assert checked > 0, "no links found: the link pattern is broken"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_readme():
    assert DOCS, "no docs/*.md pages found"
    linked = set()
    for _, target in links(README):
        path_part = target.partition("#")[0]
        if path_part and not target.lower().startswith(SKIPPED_SCHEMES):
            linked.add((README.parent / unquote(path_part)).resolve())
    missing = [str(page.relative_to(ROOT)) for page in DOCS if page.resolve() not in linked]
    assert not missing, f"docs pages README.md does not link: {missing}"
