"""mkdocs hooks: pages that show a file of the repository's root.

A page holding `<!-- include: README.md -->` shows README.md there, its links
rewritten from the root's point of view to the site's (`docs/x.md` -> `x.md`,
`ARCHITECTURE.md` -> `architecture.md`, `README.md` -> `index.md`), so the
README and ARCHITECTURE.md stay one text, read on GitHub and on the site.
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r"<!-- include: ([A-Za-z_.]+) -->")
LINKS = {
    "](docs/": "](",
    "](ARCHITECTURE.md": "](architecture.md",
    "](README.md": "](index.md",
}


def _shown(match: re.Match) -> str:
    text = (ROOT / match.group(1)).read_text()
    for old, new in LINKS.items():
        text = text.replace(old, new)
    return text


def on_page_markdown(markdown: str, **kwargs) -> str:
    return INCLUDE.sub(_shown, markdown)
