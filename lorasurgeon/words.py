"""Words for people: a count with its noun in the right number."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 tensor``, ``0 tensors``, ``1,024 tensors``; ``many``: an irregular plural (default: ``word`` + s)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"
