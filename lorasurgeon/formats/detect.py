"""Is a checkpoint quantized, and how? Told from config.json and the tensors' names and dtypes alone.

A quantized weight is stored as codes plus scales (and zero points, absmax tables, packed blocks);
read as plain values it is silently wrong. Any of these marks a checkpoint as quantized:

- config.json has a ``quantization_config`` (or the older ``compression_config``), top level or
  in ``text_config``: its ``quant_method`` names the format;
- a tensor whose name ends the way a quantized layout's does (``weight_scale_inv``, ``SCB``,
  ``absmax``, ``*_blocks`` in uint8, ``qweight``, ...);
- a ``weight`` stored as integers, or any tensor stored as float8 or float4.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..io.dtypes import FLOATING, torch_name

# Name endings that only quantized layouts use -> the format they belong to.
_SUFFIXES = (
    (".weight_scale_inv", "block FP8 (DeepSeek-V3 / Qwen3-FP8 layout)"),
    (".weight_packed", "compressed-tensors, pack-quantized"),
    (".weight_scale", "FP8 or compressed-tensors"),
    (".weight_zero_point", "compressed-tensors (asymmetric)"),
    (".weight_g_idx", "compressed-tensors (activation order)"),
    (".weight_global_scale", "compressed-tensors NVFP4"),
    (".input_scale", "FP8 with static activation scales"),
    (".weight.absmax", "bitsandbytes 4-bit"),
    (".weight.quant_map", "bitsandbytes 4-bit"),
    (".weight.nested_absmax", "bitsandbytes 4-bit, double quantized"),
    (".weight.quant_state.bitsandbytes__nf4", "bitsandbytes 4-bit (nf4)"),
    (".weight.quant_state.bitsandbytes__fp4", "bitsandbytes 4-bit (fp4)"),
    (".SCB", "bitsandbytes LLM.int8"),
    (".weight_format", "bitsandbytes LLM.int8"),
    (".qweight", "GPTQ / AWQ"),
    (".qzeros", "GPTQ / AWQ"),
)
# gpt-oss's MXFP4 experts: ``*_blocks`` and ``*_scales`` in uint8.
_MXFP4_SUFFIXES = ("_blocks", "_scales")


@dataclass(frozen=True)
class Quantization:
    """A quantized checkpoint: its format, and the first thing that showed it."""

    method: str  # quant_method from config.json, or the format the tensors show
    evidence: str  # e.g. "config.json quantization_config.quant_method = fp8", "tensor x.weight_scale_inv"

    def describe(self) -> str:
        return f"{self.method} ({self.evidence})"


@dataclass(frozen=True)
class QuantConfig:
    """config.json's quantization block: where it is, and what it holds."""

    key: str  # "quantization_config", "compression_config", "text_config.quantization_config", ...
    block: Mapping[str, Any]  # its contents ({} where the value is not an object)

    @property
    def method(self) -> str:
        return quant_method(self.block)

    @property
    def found(self) -> Quantization:
        return Quantization(
            self.method or "unknown",
            f"config.json {self.key}" + (f".quant_method = {self.method}" if self.method else ""),
        )


def quant_method(block: Mapping[str, Any]) -> str:
    """A quantization block's quant_method ("" if it names none); MLX's, which names none, holds group_size and
    bits alone (mlx-lm's ``quantization``, copied into ``quantization_config``)."""
    if block.get("quant_method"):
        return str(block["quant_method"])
    affine = block.get("mode", "affine") == "affine"  # MLX's other modes (mxfp4, ...) are not read
    return "mlx" if {"group_size", "bits"} <= set(block) and affine else ""


def quant_config(config: Mapping[str, Any]) -> QuantConfig | None:
    """The quantization block of config.json (``quantization_config``, or the older ``compression_config``;
    top level first, then in ``text_config``), or None. The one reader of that block: detection and the
    formats' dispatch both take it from here."""
    docs: list[tuple[str, Mapping[str, Any]]] = [("", config)]
    text = config.get("text_config")
    if isinstance(text, Mapping):
        docs.append(("text_config.", text))
    for where, doc in docs:
        for key in ("quantization_config", "compression_config", "quantization"):  # the last: MLX's own, older
            q = doc.get(key)
            if q:
                return QuantConfig(where + key, q if isinstance(q, Mapping) else {})
    return None


def detect(tensors: Iterable[tuple[str, str]], config: Mapping[str, Any]) -> Quantization | None:
    """The quantization of a checkpoint given its (name, safetensors dtype name) pairs and config.json, or
    None."""
    found = quant_config(config)
    return found.found if found is not None else from_tensors(tensors)


def from_tensors(tensors: Iterable[tuple[str, str]]) -> Quantization | None:
    """The quantization that (name, safetensors dtype name) pairs show by themselves, or None."""
    for name, dtype in tensors:
        for suffix, method in _SUFFIXES:
            if name.endswith(suffix):
                return Quantization(method, f"tensor {name}")
        if dtype == "U8" and name.endswith(_MXFP4_SUFFIXES):
            return Quantization("MXFP4 (gpt-oss layout)", f"tensor {name}, uint8")
        stored = torch_name(dtype).removeprefix("torch.")
        if dtype.startswith(("F8_", "F4", "F6")):
            return Quantization("float8 / float4 weights", f"tensor {name} stored as {stored}")
        if name.rpartition(".")[2] == "weight" and dtype not in FLOATING and dtype != "C64":
            return Quantization("integer weights", f"tensor {name} stored as {stored}")
    return None
