"""torch, imported when first used rather than when a module is imported.

Header-only work (inspect, check, --dry-run, every refusal found from headers, --help) needs neither
torch nor numpy, and torch's import costs seconds. Modules that compute write::

    if TYPE_CHECKING:
        import torch
    else:
        from .._lazy import torch

so the type checker sees torch itself and the first attribute read at run time imports it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """A stand-in for a module that imports it on the first attribute read."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self.__name__)
        return getattr(module, attr)


torch: Any = LazyModule("torch")
