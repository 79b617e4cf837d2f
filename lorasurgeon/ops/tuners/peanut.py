"""PEANuT: ΔW computed from W0 itself by a small non-linear network, ΔW = (B(dec(enc(act(W0ᵀ Aᵀ)))) · s)ᵀ with
``depth`` encoder and decoder layers (residual between mirrored ones) and the activation ``act_fn``. Neither
additive (ΔW depends on W0) nor inverted by PEFT (its unmerge restores a kept copy of W0): ``unmerge`` is None.

peft/tuners/peanut/layer.py: update_layer (:67: the layers, scaling = config.scaling), _compute_delta_weight
(:134), merge (:167: ``W + ΔW(W0)``), unmerge (:198). Activations: transformers' ACT2FN; the ones PyTorch
computes directly are supported here (``ACTIVATIONS``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import UnsupportedError
from ._base import ModuleConfig, Parts, Shapes, Tuner, f32, need

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' ACT2FN[name] for the activations that are one PyTorch function."""
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": torch.relu,
        "gelu": torch.nn.functional.gelu,
        "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        "silu": torch.nn.functional.silu,
        "swish": torch.nn.functional.silu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "linear": lambda x: x,
    }
    if name not in table:
        raise UnsupportedError(f"peanut: the activation {name!r} is not supported (only {sorted(table)})")
    return table[name]


@dataclass(frozen=True)
class Peanut(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        act = str(raw.get("act_fn", "relu"))
        _activation(act)  # refused now, from the config, rather than at merge time
        return {"act_fn": act, "scaling": float(raw.get("scaling", 1.0)), "depth": int(raw.get("depth", 0))}

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        w = f32(w0)
        act = _activation(cfg["act_fn"])
        delta = act(torch.matmul(w.transpose(0, 1), need(parts, "peanut_A.weight", self.name).t()))
        residuals = []
        for i in range(cfg["depth"]):
            residuals.append(delta)
            delta = act(delta @ need(parts, f"peanut_encoders.{i}.weight", self.name).T)
        for i in range(cfg["depth"]):
            delta = act(delta @ need(parts, f"peanut_decoders.{i}.weight", self.name).T)
            delta = delta + residuals[cfg["depth"] - 1 - i]
        delta = delta @ need(parts, "peanut_B.weight", self.name).T
        merged: torch.Tensor = w + (delta * cfg["scaling"]).transpose(0, 1)
        return merged

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        return None


PEANUT = Peanut(
    "peanut",
    ("peanut_A.weight", "peanut_B.weight"),
    additive=False,
    invertible=False,
    suffix_pattern=r"peanut_(?:encoders|decoders)\.\d+\.weight",
)
