"""Training display: an HTML page of result images (always), ``loss_log.txt`` and a loss-curve
PNG; visdom live plots only when ``--display_id > 0``.

visdom is imported only then. If it is not installed, or no server answers, the visualizer warns
once and carries on without it; it never waits on a server that is not there.

Under torchrun only rank 0 writes (log, images, HTML, curves) or talks to visdom; on the other
ranks every method is a no-op, so training code calls them unconditionally.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from util import distributed
from util.atomic import atomic_path, write_text
from util.html import HTML
from util.plotting import save_loss_curves

log = logging.getLogger(__name__)
VISDOM_CONNECT_TIMEOUT_S = 2.0


def tensor2im(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """The first image of a batch as HxWx3 uint8; [-1, 1] images and [0, 1] masks both map to 0-255."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image, dtype=np.float32)
    while arr.ndim > 3:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    arr = arr[:3]
    scaled = (arr + 1.0) / 2.0 if arr.min(initial=0.0) < 0 else arr
    return (np.clip(scaled, 0, 1) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def save_image(image: np.ndarray, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


class Visualizer:
    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.name = opt.name
        self.win_size = getattr(opt, "display_winsize", 256)
        self.enabled = distributed.is_main()  # rank 0 writes; the others record nothing
        self.display_id = int(getattr(opt, "display_id", 0)) if self.enabled else 0
        self.use_html = (
            self.enabled and bool(getattr(opt, "isTrain", False)) and not getattr(opt, "no_html", False)
        )
        self.run_dir = Path(opt.checkpoints_dir) / opt.name
        self.web_dir = self.run_dir / "web"
        self.img_dir = self.web_dir / "images"
        self.log_name = self.run_dir / "loss_log.txt"
        self.curve_path = self.run_dir / "loss_curve.png"
        # the curve's points, one JSON line each (appended), so a resumed run draws the whole curve
        self.history_path = self.run_dir / "loss_history.jsonl"
        self.history: dict[str, list[tuple[float, float]]] = {}
        self.saved = False
        self.vis = None
        self._warned = False
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not getattr(opt, "continue_train", False):
            self.history_path.unlink(missing_ok=True)  # a new run's curve starts empty
        with open(self.log_name, "a") as f:
            f.write(f"================ Training Loss ({time.strftime('%c')}) ================\n")
        if self.display_id > 0:
            self._connect_visdom()

    # --- visdom (opt-in) ------------------------------------------------------------------
    def _disable_visdom(self, why: str) -> None:
        if not self._warned:
            warnings.warn(
                f"visdom display off: {why}. Training continues; see {self.web_dir}/index.html", stacklevel=3
            )
            self._warned = True
        self.vis = None
        self.display_id = 0

    def _connect_visdom(self) -> None:
        try:
            import visdom
        except ImportError:
            self._disable_visdom("visdom is not installed (pip install visdom; it needs Python 3.12+ here)")
            return
        url = urlparse(
            self.opt.display_server
            if "://" in self.opt.display_server
            else f"http://{self.opt.display_server}"
        )
        host = url.hostname or "localhost"
        try:
            with socket.create_connection((host, self.opt.display_port), timeout=VISDOM_CONNECT_TIMEOUT_S):
                pass
        except OSError as exc:
            self._disable_visdom(f"no visdom server at {host}:{self.opt.display_port} ({exc})")
            return
        self.vis = visdom.Visdom(
            server=self.opt.display_server,
            port=self.opt.display_port,
            env=self.opt.display_env,
            raise_exceptions=True,
        )

    def _visdom(self, fn, *args, **kwargs) -> None:
        if self.vis is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # a server that went away must not stop training
            self._disable_visdom(f"visdom call failed ({exc})")

    # --- display --------------------------------------------------------------------------
    def reset(self) -> None:
        self.saved = False

    def display_current_results(self, visuals: OrderedDict, epoch: int, save_result: bool) -> None:
        """Show visuals in visdom (if on) and save them to the HTML page."""
        if not self.enabled:
            return
        images = {label: tensor2im(t) for label, t in visuals.items()}
        if self.vis is not None:
            stacked = np.stack([im.transpose(2, 0, 1) for im in images.values()])
            self._visdom(
                self.vis.images,
                stacked,
                nrow=self.opt.display_ncols,
                win=self.display_id + 1,
                opts={"title": f"{self.name} images"},
            )
        if self.use_html and (save_result or not self.saved):
            self.saved = True
            for label, im in images.items():
                save_image(im, self.img_dir / f"epoch{epoch:03d}_{label}.png")
            self._write_html(epoch, list(images))

    def _write_html(self, last_epoch: int, labels: list[str]) -> None:
        page = HTML(self.web_dir, f"Experiment name = {self.name}", refresh=0)
        for n in range(last_epoch, 0, -1):
            present = [lab for lab in labels if (self.img_dir / f"epoch{n:03d}_{lab}.png").exists()]
            if not present:
                continue
            page.add_header(f"epoch [{n}]")
            paths = [f"images/epoch{n:03d}_{lab}.png" for lab in present]
            page.add_images(paths, present, paths, width=self.win_size)
        page.save()

    def resume_history(self, total_iters: int) -> None:
        """Take back the loss curve's points of a resumed run up to ``total_iters`` samples (those of
        the train state it resumes from; later points belong to the run it replaces, and leave the
        file)."""
        if not self.enabled or not self.history_path.exists():
            return
        kept = []
        for line in self.history_path.read_text().splitlines():
            try:
                record = json.loads(line)
                if int(record["total_iters"]) <= total_iters:
                    kept.append(record)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run
        write_text(self.history_path, "".join(json.dumps(r) + "\n" for r in kept))
        self.history = {}
        for record in kept:
            for name, value in record["losses"].items():
                self.history.setdefault(name, []).append((record["x"], value))

    def plot_current_losses(
        self, epoch: int, counter_ratio: float, losses: OrderedDict, total_iters: int | None = None
    ) -> None:
        """Record losses at fractional epoch ``epoch + counter_ratio``; redraw the loss-curve PNG.

        With ``total_iters`` (samples trained so far) the point is also appended to
        ``loss_history.jsonl``, so a resumed run (:meth:`resume_history`) draws the whole curve."""
        if not self.enabled:
            return
        x = epoch + counter_ratio
        for name, value in losses.items():
            self.history.setdefault(name, []).append((x, float(value)))
        if total_iters is not None:
            values = {name: float(value) for name, value in losses.items()}
            record = {"total_iters": int(total_iters), "x": x, "losses": values}
            with open(self.history_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        save_loss_curves(self.history, self.curve_path, title=self.name)
        if self.vis is not None:
            names = list(self.history)
            xs = np.array([[p[0] for p in self.history[n]] for n in names]).T
            ys = np.array([[p[1] for p in self.history[n]] for n in names]).T
            self._visdom(
                self.vis.line,
                X=xs,
                Y=ys,
                win=self.display_id,
                opts={"title": f"{self.name} loss over time", "legend": names, "xlabel": "epoch"},
            )

    def print_current_losses(
        self, epoch: int, iters: int, losses: OrderedDict, t_comp: float, t_data: float
    ) -> str:
        message = f"(epoch: {epoch}, iters: {iters}, time: {t_comp:.3f}, data: {t_data:.3f}) "
        message += " ".join(f"{k}: {v:.3f}" for k, v in losses.items())
        if not self.enabled:
            return message
        print(message)
        with open(self.log_name, "a") as f:
            f.write(message + "\n")
        return message
