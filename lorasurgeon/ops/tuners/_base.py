"""The ``Tuner`` interface and the config helpers every tuner family shares (pure: dicts in, dicts out)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import AdapterConfigError, IncompatibleError, UnsupportedError

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch

Parts = Mapping[str, "torch.Tensor"]
Shapes = Mapping[str, tuple[int, ...]]
ModuleConfig = Mapping[str, Any]


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` (dict order) matching ``module`` as PEFT's ``get_pattern_key`` does
    (peft/utils/other.py:1524: ``re.match(rf"(.*\\.)?({key})$", module)``)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def pattern_value(raw: Mapping[str, Any], field: str, module: str, default_field: str) -> Any:
    """``raw[field]`` (a pattern dict such as rank_pattern) for ``module``, else ``raw[default_field]``."""
    patterns = raw.get(field) or {}
    key = pattern_key(patterns, module)
    if key is not None:
        return patterns[key]
    if default_field not in raw:
        raise AdapterConfigError(f"adapter_config.json has no {default_field!r}")
    return raw[default_field]


def f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 (itself when it already is)."""
    return x.to(torch.float32)


def transpose(x: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """PEFT's ``transpose`` (peft/utils/other.py): ``x.T`` for weights stored (in, out)."""
    return x.T if fan_in_fan_out else x


def need(parts: Parts, name: str, tuner: str) -> torch.Tensor:
    """``parts[name]`` in float32, or an error naming what is missing."""
    if name not in parts:
        raise IncompatibleError(f"{tuner}: the module has no {name!r} tensor (it has {sorted(parts)})")
    return f32(parts[name])


@dataclass(frozen=True)
class Tuner:
    """One PEFT tuner family's merge math for one adapted module.

    ``name``: PEFT's ``peft_type`` lowercased. ``module_suffixes``: the names of the module's tensors as
    ``save_pretrained`` writes them after the module path, the adapter name removed (a module holds some
    of them: the ones its variant uses). ``shared_keys``: adapter-wide tensors (``base_model.<key>`` in the
    file; ``shared_parts`` maps them to saved keys, per module for FRoD), handed to ``merge`` in ``parts``.
    ``layers``: the layer kinds whose math this implements (``ops.lora.LayerName`` values, and "norm").
    ``additive``: ``merge(w0) == w0 + delta`` with a delta that does not depend on ``w0`` (otherwise the
    tuner multiplies, rotates, or derives ΔW from W0). ``bias``: whether merging also changes the layer's
    bias (``merge_bias``). ``invertible``: ``unmerge`` can undo a merge (else it returns None).
    ``split_key`` splits a saved key into (module, suffix) by ``module_suffixes`` (and ``suffix_pattern``).
    """

    name: str
    module_suffixes: tuple[str, ...]
    shared_keys: tuple[str, ...] = ()
    layers: tuple[str, ...] = ("linear",)
    additive: bool = True
    bias: bool = False
    invertible: bool = True  # False: ``unmerge`` returns None (PEFT has none, or restores a W0 it kept)
    suffix_pattern: str = ""  # a regex for suffixes a fixed list cannot hold (PEANuT's per-depth layers)

    def shared_parts(self, module_name: str) -> dict[str, str]:
        """The adapter-wide tensors the module ``module_name`` uses: part name -> saved key."""
        return {k: f"base_model.{k}" for k in self.shared_keys}

    def split_key(self, key: str) -> tuple[str, str] | None:
        """(module_name, suffix) of a saved key with ``base_model.model.`` removed, or None if not this tuner's."""
        for suffix in self.module_suffixes:
            if key.endswith("." + suffix):
                return key[: -len(suffix) - 1], suffix
        if self.suffix_pattern:
            match = re.match(rf"^(.*)\.({self.suffix_pattern})$", key)
            if match:
                return match.group(1), match.group(2)
        return None

    def module_config(
        self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes, layer: str = "linear"
    ) -> dict[str, Any]:
        """What the math needs from adapter_config.json (``raw``) for the module ``module_name`` (its path in
        the base model, as PEFT's ``current_key``: ``model.layers.0.self_attn.q_proj``), whose saved tensors
        have ``parts_shapes`` (shared tensors included) and whose base layer is a ``layer``."""
        if layer not in self.layers:
            raise UnsupportedError(f"{self.name}: merging into a {layer} layer is not supported ({self.layers})")
        cfg = self._config(raw, module_name, parts_shapes)
        cfg["layer"] = layer
        cfg.setdefault("fan_in_fan_out", layer == "conv1d")  # PEFT forces it from the layer type
        return cfg

    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        return {}

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        """ΔW of an additive tuner, float32, shaped ``shape`` (the base weight's)."""
        raise NotImplementedError

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        """The merged weight, float32, as PEFT's ``merge``/``merge_and_unload`` computes it."""
        w = f32(w0)
        return w + self.delta_weight(tuple(w.shape), parts, cfg)

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        """PEFT's ``unmerge`` of a merged weight (None where PEFT has none)."""
        w32 = f32(w)
        return w32 - self.delta_weight(tuple(w32.shape), parts, cfg)

    def delta(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        """``merge(w0) - w0`` (for an additive tuner, ΔW itself, computed without ``w0``'s values)."""
        if self.additive:
            return self.delta_weight(tuple(w0.shape), parts, cfg)
        return self.merge(w0, parts, cfg) - f32(w0)

    def merge_bias(
        self, b0: torch.Tensor, parts: Parts, cfg: ModuleConfig, w0: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The merged bias, or None when merging leaves the bias as it is. ``w0``: the layer's weight before
        merging (GLoRA's bias update depends on it)."""
        return None

    def unmerge_bias(
        self, b: torch.Tensor, parts: Parts, cfg: ModuleConfig, w0: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """PEFT's unmerge of the bias, or None when the bias is left as it is. ``w0``: the unmerged weight
        (``unmerge``'s result)."""
        return None
