"""Trainable tokens (the standalone PEFT type): the embedding rows ``token_indices`` are replaced by the saved
``trainable_tokens_delta`` rows (despite the name, the new values, not a difference). Unmerge writes back
``trainable_tokens_original`` when the file has it.

peft/tuners/trainable_tokens/layer.py: update_layer (:109), merge (:185: ``index_copy`` of the rows), unmerge
(:207). As a part of a LoRA adapter (trainable_token_indices) lorasurgeon handles it already
(``ops.lora.replace_rows``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import AdapterConfigError, IncompatibleError
from ._base import ModuleConfig, Parts, Shapes, Tuner, f32, need

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class TrainableTokens(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        indices = raw.get("token_indices")
        if not isinstance(indices, list) or not indices:
            raise AdapterConfigError("a trainable-tokens adapter_config.json without token_indices")
        saved = parts_shapes.get("trainable_tokens_delta")
        if saved is not None and saved[0] != len(indices):
            raise IncompatibleError(f"trainable_tokens: {saved[0]} rows saved, {len(indices)} token_indices")
        return {"token_indices": tuple(int(i) for i in indices)}

    def _put(self, w: torch.Tensor, rows: torch.Tensor, cfg: ModuleConfig) -> torch.Tensor:
        index = torch.tensor(cfg["token_indices"], dtype=torch.long)
        return w.index_copy(dim=0, index=index, source=rows)

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        return self._put(f32(w0), need(parts, "trainable_tokens_delta", self.name), cfg)

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        if "trainable_tokens_original" not in parts:
            return None
        return self._put(f32(w), need(parts, "trainable_tokens_original", self.name), cfg)


TRAINABLE_TOKENS = TrainableTokens(
    "trainable_tokens",
    ("trainable_tokens_delta", "trainable_tokens_original"),
    layers=("embedding", "linear"),
    additive=False,
    invertible=False,
)
