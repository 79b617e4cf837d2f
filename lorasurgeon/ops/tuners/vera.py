"""VeRA: frozen random projections shared by every module (``vera_A`` (r, max_in), ``vera_B`` (max_out, r)),
two trained vectors per module. Additive:

    ΔW = transpose((λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in]), fan_in_fan_out)    (peft/tuners/vera/layer.py:214)

The file holds A and B as ``base_model.vera_A`` / ``base_model.vera_B`` when ``save_projection`` (the default;
vera/model.py:277); otherwise ``projections`` regenerates them from ``projection_prng_key``
(vera/model.py:147 ``_init_vera_A_vera_B``, :49 ``_kaiming_init``) given the largest (out, in) over the
targeted linear layers (model.py:113 ``_find_dim``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._base import ModuleConfig, Parts, Shapes, Tuner, need, transpose

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    fan_in = shape[1]  # torch's _calculate_correct_fan(tensor, "fan_in") of a 2-D tensor
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, largest: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vera_A, vera_B) as PEFT makes them for ``save_projection=False``: ``largest`` = (max out, max in)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_a = _kaiming_uniform((r, largest[1]), generator)
    vera_b = _kaiming_uniform((largest[0], r), generator)
    return vera_a, vera_b


@dataclass(frozen=True)
class VeRA(Tuner):
    mean_half: bool = False

    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        return {
            "save_projection": bool(raw.get("save_projection", True)),
            "projection_seed": raw.get("projection_prng_key"),
        }

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        out_f, in_f = shape[::-1] if cfg["fan_in_fan_out"] else shape
        p = self.name  # "vera" or "pvera": the tensor names' prefix
        sliced_a = need(parts, f"{p}_A", p)[:, :in_f]
        sliced_b = need(parts, f"{p}_B", p)[:out_f, :]
        lambda_b = need(parts, f"{p}_lambda_b", p).unsqueeze(-1)
        lambda_d = need(parts, f"{p}_lambda_d", p).unsqueeze(-1)
        if self.mean_half:  # PVeRA: the mean half of the (mean, log-variance) projection
            lambda_d = lambda_d[: lambda_d.size(0) // 2, :]
            sliced_a = sliced_a[: sliced_a.size(0) // 2, :]
        product = (lambda_b * sliced_b) @ (lambda_d * sliced_a)
        return transpose(product, cfg["fan_in_fan_out"])


VERA = VeRA("vera", ("vera_lambda_b", "vera_lambda_d"), shared_keys=("vera_A", "vera_B"), layers=("linear", "conv1d"))
# PVeRA (peft/tuners/pvera/layer.py:243 get_delta_weight): VeRA whose A and λ_d have 2r rows, the first r the
# mean of a sampled code; merging uses the mean (model.py: pvera_A / pvera_B saved like VeRA's).
PVERA = VeRA(
    "pvera",
    ("pvera_lambda_b", "pvera_lambda_d"),
    shared_keys=("pvera_A", "pvera_B"),
    layers=("linear", "conv1d"),
    mean_half=True,
)
