"""mkdocs hooks: pages that show a file of the repository's root; docstring
warnings of the packages being restructured let through.

A page holding `<!-- include: README.md -->` shows README.md there, its links
rewritten from the root's point of view to the site's (`docs/x.md` -> `x.md`,
`ARCHITECTURE.md` -> `architecture.md`, `README.md` -> `index.md`), so the
README and ARCHITECTURE.md stay one text, read on GitHub and on the site.
"""

from __future__ import annotations

import logging
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r"<!-- include: ([A-Za-z_.]+) -->")
LINKS = {
    "](docs/": "](",
    "](ARCHITECTURE.md": "](architecture.md",
    "](README.md": "](index.md",
}


# Issue 29 restructures these packages (DataParallel's modes as policies, one
# tensor-parallel mechanism); their docstrings' parse warnings (arguments
# grouped on one line, parameters without annotation) are shown without failing
# the strict build until then. Every other module's warning fails it.
RESTRUCTURING = (
    "keras_parallel/data_parallel/",
    "keras_parallel/layers/",
    "keras_parallel/mesh/",
)


class _Restructuring(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno == logging.WARNING and any(
            f"griffe: {p}" in message for p in RESTRUCTURING
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


logging.getLogger("mkdocs.plugins.griffe").addFilter(_Restructuring())


def _shown(match: re.Match) -> str:
    text = (ROOT / match.group(1)).read_text()
    for old, new in LINKS.items():
        text = text.replace(old, new)
    return text


def on_page_markdown(markdown: str, **kwargs) -> str:
    return INCLUDE.sub(_shown, markdown)
