"""WaveFT: a sparse set of wavelet coefficients at fixed random positions. With ``use_idwt`` (PEFT's default)
ΔW is their inverse 2-D wavelet transform (peft/tuners/waveft/waverec2d.py, with the filter banks of
wavelet.py), which is not reproduced here: ``module_config`` refuses it. Without it, ΔW is the sparse matrix
itself times ``scaling``. Additive: W += transpose(ΔW, fan_in_fan_out).

peft/tuners/waveft/layer.py: update_layer (:68: positions ``randperm(out·in)`` seeded by random_loc_seed, the
first n_frequency), get_delta_weight (:124), merge (:218), unmerge (:255). n_frequency is the saved
spectrum's length (patterns and proportional_parameters only decide it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import UnsupportedError
from ._base import ModuleConfig, Parts, Shapes, Tuner, need, transpose
from .fourierft import frequencies

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class WaveFT(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        if raw.get("use_idwt", True):
            raise UnsupportedError("waveft: use_idwt (an inverse wavelet transform of the spectrum) is not supported")
        return {"scaling": float(raw.get("scaling", 25.0)), "random_loc_seed": int(raw.get("random_loc_seed", 777))}

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        out_f, in_f = shape[::-1] if cfg["fan_in_fan_out"] else shape
        spectrum = need(parts, "waveft_spectrum", self.name)
        indices = frequencies(out_f, in_f, spectrum.shape[0], cfg["random_loc_seed"])
        dense = torch.zeros(out_f, in_f)
        dense[indices[0, :], indices[1, :]] = spectrum
        return transpose(dense * cfg["scaling"], cfg["fan_in_fan_out"])


WAVEFT = WaveFT("waveft", ("waveft_spectrum",), layers=("linear", "conv1d"))
