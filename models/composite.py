"""The SHRM composite: insert a generated band of a chosen height between the real neighbours.

``compose(generated, original, x1, x2, rows, fill)`` builds, per sample ``b``, with
``top = (x1 + x2) // 2 - rows // 2``:

    out rows [0, top)            <- original rows [x1 - top, x1)          (real content above)
    out rows [top, top + rows)   <- generated rows [top, top + rows)      (the synthesised vertebra)
    out rows [top + rows, H)     <- original rows [x2, x2 + H - top - rows) (real content below)

Source rows outside ``[0, H)`` give ``fill`` (-1 for CT, 0 for label maps). With
``rows = x2 - x1`` the output equals ``original`` outside the target. The function is pure,
batched and differentiable with respect to ``generated`` (and ``original``); the integer rows
carry no gradient, so the height heads learn through the height loss alone. The iterative 3D
synthesis calls it for label maps as well as images.
"""

from __future__ import annotations

import torch


def _per_sample(value: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(value, device=device).long().reshape(-1).expand(batch).reshape(batch, 1)


def compose_top(x1: torch.Tensor, x2: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """First output row of the generated band: ``(x1 + x2) // 2 - rows // 2`` (integer tensors)."""
    return torch.div(x1 + x2, 2, rounding_mode="floor") - torch.div(rows, 2, rounding_mode="floor")


def compose(
    generated: torch.Tensor,
    original: torch.Tensor,
    x1: torch.Tensor | int,
    x2: torch.Tensor | int,
    rows: torch.Tensor | int,
    fill: float,
) -> torch.Tensor:
    """The composite of ``generated`` (B, C, H, W) inserted into ``original`` (B, C, H, W).

    Args:
        generated: generator output in the frame of the hole (its rows [top, top+rows) are kept).
        original: the unsqueezed slice whose target occupies rows [x1, x2).
        x1, x2: per-sample first and last+1 target rows (shape (B,) or (B, 1), or ints).
        rows: per-sample number of generated rows to insert (>= 0).
        fill: value for rows whose source lies outside the slice.
    Returns:
        (B, C, H, W) tensor, dtype of ``generated``.
    """
    if generated.shape != original.shape:
        raise ValueError(f"generated {tuple(generated.shape)} and original {tuple(original.shape)} differ")
    b, c, h, w = generated.shape
    device = generated.device
    x1, x2, rows = (_per_sample(v, b, device) for v in (x1, x2, rows))
    top = compose_top(x1, x2, rows)
    r = torch.arange(h, device=device).reshape(1, h)  # (1, H)
    above, inside = r < top, (r >= top) & (r < top + rows)
    source = torch.where(above, x1 - top + r, x2 + r - top - rows)  # rows of `original` for context
    valid = (source >= 0) & (source < h)
    index = source.clamp(0, h - 1).reshape(b, 1, h, 1).expand(b, c, h, w)
    context = torch.gather(original.to(generated.dtype), 2, index)
    context = torch.where(valid.reshape(b, 1, h, 1), context, torch.full_like(context, fill))
    return torch.where(inside.reshape(b, 1, h, 1), generated, context)
