"""Words for people: a count with its noun in the right number."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 tensor``, ``0 tensors``, ``1,024 tensors``; ``many``: an irregular plural (default: ``word`` + s)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def article(word: str) -> str:
    """``an IA3``, ``an OFT``, ``a LOHA``: ``word`` with its article, by its first letter (the tuners' names
    are read as words, LOHA "loha", but the ones with a vowel first are read either way with "an")."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"
