"""A small HTML page of result images, written with dominate."""

from __future__ import annotations

import os
from pathlib import Path

import dominate
from dominate.tags import a, br, h3, img, meta, p, table, td, tr

from util.atomic import write_text


class HTML:
    """Images in rows under headers; ``save`` writes ``index.html`` atomically."""

    def __init__(self, web_dir: str | os.PathLike, title: str, refresh: int = 0):
        self.web_dir = Path(web_dir)
        self.img_dir = self.web_dir / "images"
        self.img_dir.mkdir(parents=True, exist_ok=True)
        self.doc = dominate.document(title=title)
        if refresh > 0:
            with self.doc.head:
                meta(http_equiv="refresh", content=str(refresh))

    def get_image_dir(self) -> Path:
        return self.img_dir

    def add_header(self, text: str) -> None:
        with self.doc:
            h3(text)

    def add_text(self, text: str) -> None:
        with self.doc:
            p(text)

    def add_images(self, ims: list[str], txts: list[str], links: list[str], width: int = 256) -> None:
        """One row of images (paths relative to the page), captions and click-through links."""
        t = table(border=1, style="table-layout: fixed;")
        self.doc.add(t)
        with t, tr():
            for im, txt, link in zip(ims, txts, links, strict=True):
                with td(style="word-wrap: break-word;", halign="center", valign="top"), p():
                    with a(href=link):
                        img(style=f"width:{width}px", src=im)
                    br()
                    p(txt)

    def save(self, name: str = "index.html") -> Path:
        path = self.web_dir / name
        write_text(path, self.doc.render())
        return path
