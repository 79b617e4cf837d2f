"""A quantized checkpoint's layout, and the checkpoint as plain float32 weights (a view, read lazily).

``find_layout`` asks the registered formats (``formats.registry.FORMATS``, in order) which one claims
the checkpoint, has that one find its quantized weights, and refuses by name anything quantized that
none of them reads. ``dequantized`` gives a Checkpoint view in which each quantized weight is one
tensor under its plain name (float32, computed from its stored parts when read) and the stored parts
are hidden: every command reads it like an unquantized checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError
from ..io.checkpoint import Checkpoint, Decoded, TensorInfo
from ..words import plural
from .base import Headers, QuantTensor
from .detect import Quantization, from_tensors, quant_config
from .registry import claiming, reads

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

# Per-module activation scales of a quantized checkpoint: meaningless in a plain one, and possibly
# stale once a merge changes the weight before them.
# activation scales (and ComfyUI's scaled_fp8 marker): kept beside a kept format, dropped from a dequantized one
STATIC_SCALES = (".input_scale", ".output_scale", ".k_scale", ".v_scale", ".scale_input", "scaled_fp8")
READS = reads()  # "block FP8, compressed-tensors (...), ...": what a refusal says lorasurgeon reads


@dataclass(frozen=True)
class QuantLayout:
    """Which tensors of a checkpoint are quantized, and how."""

    found: Quantization  # what detect() saw first (config key or tensor)
    qconfig: Mapping[str, Any] = field(compare=False)  # config.json's quantization_config ({} if none)
    tensors: dict[str, QuantTensor] = field(compare=False)  # by plain name
    static_scales: tuple[str, ...] = ()  # activation scales that belong to quantized modules

    @property
    def parts(self) -> set[str]:
        return {info.name for qt in self.tensors.values() for _, info in qt.parts}

    @property
    def methods(self) -> list[str]:
        return sorted({qt.codec.method for qt in self.tensors.values()})

    def describe(self) -> str:
        return f"{', '.join(self.methods) or self.found.method} ({plural(len(self.tensors), 'quantized weight')})"


def find_layout(ckpt: Checkpoint, config: Mapping[str, Any]) -> QuantLayout | None:
    """The quantized weights of ``ckpt`` (None if it is not quantized).

    Raises:
        UnsupportedError: a quantized format, or a quantized tensor, that lorasurgeon does not read.
        CorruptCheckpointError: a format's parts that do not fit together.
    """
    infos = {i.name: i for i in ckpt.infos()}
    qc = quant_config(config)
    found = qc.found if qc is not None else from_tensors((i.name, i.dtype_name) for i in infos.values())
    if found is None:
        return None
    qconfig: Mapping[str, Any] = qc.block if qc is not None else {}
    names = list(infos)
    fmt = claiming(qconfig, names, {n: i.dtype_name for n, i in infos.items()})
    if fmt is None:
        raise UnsupportedError(
            f"{ckpt.root}: quantized as {found.describe()}, a format lorasurgeon does not read (it reads {READS})"
        )
    tensors = fmt.find(Headers(infos, ckpt.read_info), qconfig)
    layout = QuantLayout(found, qconfig, {qt.name: qt for qt in tensors})
    covered = layout.parts
    statics = tuple(n for n in names if n.endswith(STATIC_SCALES) and n not in covered)
    left = from_tensors((n, infos[n].dtype_name) for n in names if n not in covered and n not in statics)
    if left is not None:
        raise UnsupportedError(
            f"{ckpt.root}: {left.evidence} is quantized ({left.method}) but not in a layout lorasurgeon reads "
            f"(it reads {READS})"
        )
    return replace(layout, static_scales=statics)


def dequantized(ckpt: Checkpoint, layout: QuantLayout, *, keep_static: bool = False) -> Checkpoint:
    """``ckpt`` with each quantized weight as one float32 tensor under its plain name, decoded when read;
    the stored parts left out (a result that keeps them reads them from ``ckpt`` itself), static activation
    scales left out unless kept."""
    first = {qt.parts[0][1].name: qt for qt in layout.tensors.values()}
    parts = layout.parts
    hidden_static = set() if keep_static else set(layout.static_scales)
    infos: list[TensorInfo] = []
    for info in ckpt.infos():
        qt = first.get(info.name)
        if qt is not None:
            decoded = Decoded(tuple(i for _, i in qt.parts), partial(_decode, qt))
            infos.append(TensorInfo.of(qt.name, torch.float32, qt.shape, info.file, None, decoded=decoded))
        elif info.name not in parts and info.name not in hidden_static:
            infos.append(info)
    return Checkpoint(ckpt.root, ckpt.format, list(ckpt.files), infos, ckpt.metadata, ckpt.index_file)


def _decode(qt: QuantTensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    return qt.codec.dequantize(qt, dict(zip(qt.roles, tensors, strict=True)))
