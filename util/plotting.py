"""Pictures of volumes: sagittal previews with label outlines, loss curves.

Matplotlib runs headless (Agg). Images are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data.nifti_io import Volume, reorient  # noqa: E402
from util.atomic import atomic_path  # noqa: E402

BONE_WINDOW = (-300.0, 800.0)


def window(hu: np.ndarray, lo: float = BONE_WINDOW[0], hi: float = BONE_WINDOW[1]) -> np.ndarray:
    """Map HU to [0, 1] through a window, clipped."""
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


def label_colours(labels: Sequence[int]) -> dict[int, tuple[float, float, float, float]]:
    cmap = plt.get_cmap("tab20")
    return {int(v): cmap(int(v) % 20) for v in labels}


def mid_sagittal(
    ct: Volume | None, mask: Volume
) -> tuple[np.ndarray | None, np.ndarray, tuple[float, float]]:
    """The sagittal slice through the spine's mean left-right position, in canonical orientation.

    Returns (CT slice or None, label slice, (row spacing, column spacing)); rows run superior to
    inferior, columns anterior to posterior.
    """
    m = reorient(mask)
    idx = np.nonzero(m.array)
    k = int(round(float(np.mean(idx[2])))) if idx[0].size else m.shape[2] // 2
    ct_slice = reorient(ct).array[:, :, k] if ct is not None else None
    return ct_slice, m.array[:, :, k], (float(m.spacing[0]), float(m.spacing[1]))


def draw_slice(
    ax,
    image: np.ndarray | None,
    labels: np.ndarray | None,
    spacing=(1.0, 1.0),
    title: str = "",
    windowed: bool = False,
) -> None:
    """Show a 2D slice (HU, or already windowed to [0, 1]) with label outlines."""
    if image is not None:
        shown = image if windowed else window(image)
        ax.imshow(shown, cmap="gray", vmin=0, vmax=1, aspect=spacing[0] / spacing[1], interpolation="nearest")
    if labels is not None:
        present = [int(v) for v in np.unique(labels) if v]
        colours = label_colours(present)
        if image is None:
            ax.imshow(np.zeros(labels.shape), cmap="gray", aspect=spacing[0] / spacing[1])
        for v in present:
            ax.contour((labels == v).astype(float), levels=[0.5], colors=[colours[v]], linewidths=0.8)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def save_sagittal_preview(
    panels: Sequence[tuple[str, Volume | None, Volume]], path: str | os.PathLike
) -> None:
    """One row of mid-sagittal panels, each (title, CT or None, mask)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4.2))
    axes = np.atleast_1d(axes)
    for ax, (title, ct, mask) in zip(axes, panels, strict=True):
        ct_slice, lab_slice, spacing = mid_sagittal(ct, mask)
        draw_slice(ax, ct_slice, lab_slice, spacing, title)
    save_figure(fig, path)


def save_loss_curves(
    history: dict[str, list[tuple[float, float]]], path: str | os.PathLike, title: str = ""
) -> None:
    """Plot each loss's (epoch, value) points."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in sorted(history.items()):
        if points:
            x, y = zip(*points, strict=True)
            ax.plot(x, y, label=name, linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    if history:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
