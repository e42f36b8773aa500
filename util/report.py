"""``report.html``: sections of text, figures and tables, written with dominate."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import dominate
import dominate.util
from dominate.tags import a, div, figcaption, figure, h1, h2, img, p, style, table, tbody, td, th, thead, tr

from util.atomic import write_text

_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; }
figure { display: inline-block; margin: 0.5em; }
figcaption { font-size: 0.8em; color: #555; }
.bad { color: #b00; font-weight: bold; }
"""


class Report:
    """Build a page section by section; image paths are stored relative to the page."""

    def __init__(self, path: str | os.PathLike, title: str):
        self.path = Path(path)
        self.doc = dominate.document(title=title)
        with self.doc.head:
            style(_CSS)
        with self.doc:
            h1(title)

    def section(self, title: str, text: str = "") -> None:
        with self.doc:
            h2(title)
            if text:
                p(text)

    def text(self, text: str) -> None:
        with self.doc:
            p(text)

    def links(self, label: str, items: Sequence[tuple[str | os.PathLike, str]]) -> None:
        """One paragraph: ``label`` then a link per (file, text), paths relative to the page."""
        with self.doc, p(label + " "):
            for i, (path, text) in enumerate(items):
                a(text, href=os.path.relpath(path, self.path.parent))
                if i < len(items) - 1:
                    dominate.util.text(", ")

    def figures(self, items: Sequence[tuple[str | os.PathLike, str]], width: int = 480) -> None:
        with self.doc, div():
            for image, caption in items:
                with figure():
                    img(src=os.path.relpath(image, self.path.parent), style=f"width:{width}px")
                    figcaption(caption)

    def table(
        self, header: Sequence[str], rows: Sequence[Sequence], highlight: Sequence[bool] | None = None
    ) -> None:
        with self.doc, table():
            with thead(), tr():
                for h in header:
                    th(str(h))
            with tbody():
                for i, row in enumerate(rows):
                    with tr(cls="bad" if highlight is not None and highlight[i] else ""):
                        for cell in row:
                            td(f"{cell:.2f}" if isinstance(cell, float) else str(cell))

    def save(self) -> Path:
        write_text(self.path, self.doc.render())
        return self.path
