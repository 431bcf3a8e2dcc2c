"""What the benchmark scripts share: writing their markdown report to ``--out``."""

from __future__ import annotations

import os


def save(text: str, out: str | None) -> None:
    """Write ``text`` to ``out`` (creating its folder); nothing when ``out`` is empty."""
    if not out:
        return
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        fh.write(text)
