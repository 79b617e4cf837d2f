"""FourierFT: a sparse spectrum at fixed random frequencies, ΔW = Re(ifft2(dense spectrum)) · scaling. Additive.

peft/tuners/fourierft/layer.py: update_layer (:57: the frequencies, ``torch.randperm(out·in)`` from a
Generator seeded with ``random_loc_seed``, first n_frequency, as (idx // in, idx % in)), get_delta_weight
(:94), merge (:120: ``W += transpose(ΔW, fan_in_fan_out)``), unmerge (:157). n_frequency by
n_frequency_pattern with ``re.match(rf".*\\.{key}$", current_key)``, first match (fourierft/model.py:68).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import IncompatibleError
from ._base import ModuleConfig, Parts, Shapes, Tuner, need, transpose

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def n_frequency(raw: Mapping[str, Any], module_name: str) -> int:
    """FourierFTModel._create_and_replace's n_frequency for ``module_name``."""
    patterns = raw.get("n_frequency_pattern") or {}
    key = next((k for k in patterns if re.match(rf".*\.{k}$", module_name)), None)
    return int(patterns[key] if key is not None else raw.get("n_frequency", 1000))


def frequencies(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """The (2, n) row/column indices of the spectrum's entries, as FourierFTLayer.update_layer draws them."""
    indices = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([indices // in_features, indices % in_features], dim=0)


@dataclass(frozen=True)
class FourierFT(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        n = n_frequency(raw, module_name)
        saved = parts_shapes.get("fourierft_spectrum")
        if saved is not None and tuple(saved) != (n,):
            raise IncompatibleError(f"fourierft: {module_name} has {saved} frequencies, the config says {n}")
        return {
            "n_frequency": n,
            "scaling": float(raw.get("scaling", 150.0)),
            "random_loc_seed": int(raw.get("random_loc_seed", 777)),
        }

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        out_f, in_f = shape[::-1] if cfg["fan_in_fan_out"] else shape
        spectrum = need(parts, "fourierft_spectrum", self.name)
        indices = frequencies(out_f, in_f, cfg["n_frequency"], cfg["random_loc_seed"])
        dense = torch.zeros(out_f, in_f)
        dense[indices[0, :], indices[1, :]] = spectrum
        delta: torch.Tensor = torch.fft.ifft2(dense).real * cfg["scaling"]
        return transpose(delta, cfg["fan_in_fan_out"])


FOURIERFT = FourierFT("fourierft", ("fourierft_spectrum",), layers=("linear", "conv1d"))
