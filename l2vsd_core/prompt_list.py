"""Prompt files and the folder names made from prompts: shared by ``batch`` and the benchmarks."""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["read_prompts", "slug"]


def read_prompts(path) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments skipped.  ``ValueError`` for a file without prompts,
    ``FileNotFoundError`` for a missing one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} not found (one prompt per line)")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [line.split("#", 1)[0].strip() for line in lines]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line; '#' starts a comment)")
    return prompts


def slug(text: str) -> str:
    """``"A red cube!"`` → ``"a_red_cube"``: lowercase letters and digits joined by ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
