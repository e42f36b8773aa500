"""Iterative 3D synthesis of pseudo-healthy vertebrae (neighbours first, then the target).

Writes ``<out>/CT_fake/<pid>_<vid>.nii.gz`` and ``<out>/label_fake/<pid>_<vid>.nii.gz``. The
synthesis needs the trained ``healthivert`` model, which is not in this version yet.
"""

from __future__ import annotations

import sys

from util.pending import not_available


def main(argv: list[str] | None = None) -> int:
    return not_available(
        "eval_3d_sagittal_twostage.py", "iterative 3D synthesis (needs the healthivert model)"
    )


if __name__ == "__main__":
    sys.exit(main())
