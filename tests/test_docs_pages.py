"""The README is a front page, and its links and the docs/ pages' links lead somewhere.

* README.md is at most 150 lines;
* every docs/*.md page the README links to exists, and every docs/*.md page is linked from the
  README (no page a reader cannot find from the front page);
* every relative link in README.md and docs/*.md resolves: the file (or folder) exists, and a
  `#fragment` into a Markdown page names one of its headings (GitHub's anchor rule);
* every ```python block compiles.

The commands in these pages are checked by tests/test_readme_commands.py.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 150

FENCE = re.compile(r"^(```+|~~~+).*?^\1[ \t]*$", flags=re.M | re.S)
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", flags=re.I)


def _pages() -> list[Path]:
    return [README] + sorted(DOCS.glob("*.md"))


def _prose(markdown: str) -> str:
    """The page without fenced code blocks and inline code (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", markdown))


def _links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text()))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but `-`/`_` removed,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"[*`~]|<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", FENCE.sub("", page.read_text()), flags=re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_readme_is_a_front_page_of_at_most_150_lines():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail to docs/"


def test_readme_links_every_docs_page_and_each_exists():
    linked = {(README.parent / unquote(t.split("#", 1)[0])).resolve()
              for t in _links(README) if not EXTERNAL.match(t) and t.split("#", 1)[0].startswith("docs/")}
    missing = sorted(str(p.relative_to(ROOT)) for p in linked if p.suffix == ".md" and not p.is_file())
    assert not missing, f"the README links docs pages that do not exist: {missing}"
    pages = {p.resolve() for p in DOCS.glob("*.md")}
    assert pages, "docs/ holds the topic pages"
    orphans = sorted(str(p.relative_to(ROOT)) for p in pages - linked)
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_every_relative_link_resolves():
    broken = []
    for page in _pages():
        for target in _links(page):
            if EXTERNAL.match(target):
                continue
            path, _, fragment = unquote(target).partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{fragment} in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_python_blocks_compile():
    for page in _pages():
        for code in re.findall(r"^```python[ \t]*\n(.*?)^```", page.read_text(), flags=re.M | re.S):
            compile(code, str(page), "exec")


def test_slug_follows_githubs_rule():
    assert slug("Limits and error codes (what a 4xx, 503 or 408 means)") == \
        "limits-and-error-codes-what-a-4xx-503-or-408-means"
    assert slug("The pointing game (`--pointing-game N`)") == "the-pointing-game---pointing-game-n"
    assert slug("Tokens (`AuthenticationError: ... Missing authentication token`)") == \
        "tokens-authenticationerror--missing-authentication-token"
