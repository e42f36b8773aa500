"""RHLV quantification (relative height loss per vertebra).

Not in this version yet: this script exits with a message until its stage lands.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.pending import not_available


def main(argv: list[str] | None = None) -> int:
    return not_available(
        "evaluation/RHLV_quantification.py", "RHLV quantification (relative height loss per vertebra)"
    )


if __name__ == "__main__":
    sys.exit(main())
