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


def _config_method(config: Mapping[str, Any]) -> tuple[str, str] | None:
    docs = [("", config)]
    text = config.get("text_config")
    if isinstance(text, Mapping):
        docs.append(("text_config.", text))
    for where, doc in docs:
        for key in ("quantization_config", "compression_config"):
            q = doc.get(key)
            if q:
                method = q.get("quant_method") if isinstance(q, Mapping) else None
                return str(method or "unknown"), f"config.json {where}{key}" + (
                    f".quant_method = {method}" if method else ""
                )
    return None


def detect(tensors: Iterable[tuple[str, str]], config: Mapping[str, Any]) -> Quantization | None:
    """The quantization of a checkpoint given its (name, safetensors dtype name) pairs and config.json, or
    None."""
    found = _config_method(config)
    if found:
        return Quantization(*found)
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
