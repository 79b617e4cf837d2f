"""The consumers of adapters lorasurgeon knows (``check --for``, ``--for``): one module each, one line here.

``consumer(name)`` is the only way commands reach one: none of them branches on a consumer's name.
"""

from __future__ import annotations

from ..errors import InvalidOptionError
from .base import Consumer, Findings, Problem, Severity
from .llama_cpp import LLAMA_CPP
from .vllm import VLLM

__all__ = ["CONSUMERS", "Consumer", "Findings", "Problem", "Severity", "choices", "consumer"]

CONSUMERS: dict[str, Consumer] = {c.name: c for c in (VLLM, LLAMA_CPP)}


def choices() -> str:
    """The consumers' names in words: "vllm or llama.cpp"."""
    names = list(CONSUMERS)
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def consumer(name: str, option: str = "consumer") -> Consumer:
    """The consumer of this name.

    Raises:
        InvalidOptionError: an unknown name (``option`` says what gave it: "consumer", "--for").
    """
    found = CONSUMERS.get(name)
    if found is None:
        raise InvalidOptionError(f"unknown {option} {name!r}: choose {choices()}")
    return found
