"""Names for files and directories the engine sets aside (it renames, never deletes)."""

from __future__ import annotations

import time
from pathlib import Path


def aside_name(path: Path, tag: str) -> Path:
    """``<name>.<tag>-<YYYYmmdd-HHMMSS>`` next to ``path``, with ``-N`` added if that is taken."""
    base = f"{path.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    target = path.with_name(base)
    n = 1
    while target.exists():
        target = path.with_name(f"{base}-{n}")
        n += 1
    return target
