"""kohya-ss's LoRA format (sd-scripts' ``networks/lora.py``; what ComfyUI, Forge and A1111 load): one
.safetensors of ``lora_unet_<module>`` / ``lora_te_<module>`` (SD 1.x), ``lora_te1_`` / ``lora_te2_`` (SDXL's two
text encoders) keys, the module's path with every ``.`` written ``_``, each with ``.lora_down.weight``
([r, in] or a conv's [r, in, kh, kw]), ``.lora_up.weight`` ([out, r] or [out, r, 1, 1]) and a 0-dim ``.alpha``
(absent: the rank). ΔW = alpha / r · up @ down -- PEFT's LoRA (a conv's as PEFT's Conv2d LoRA), down as lora_A.
OneTrainer's ``lora_transformer_`` (a transformer's modules in diffusers' names) is read too, and written for a
transformer named as diffusers names it: ComfyUI maps that prefix for Flux, not ``lora_unet_`` + diffusers' names
(``comfy/lora.py``: ``model_lora_keys_unet``). An original single file's modules are written ``lora_unet_`` + their
name below ``diffusion_model.`` (kohya's own Flux and SGM names).

LyCORIS's LoCon writes the same keys with two more leaves (docs/formats.md §12): ``dora_scale``, its DoRA
magnitude, read as PEFT's lora_magnitude_vector where it is one value per output unit; and a k×k conv's Tucker core
``lora_mid.weight``, read as a plain conv LoRA whose lora_A is the core contracted with lora_down, computed when read.

The flattened names cannot be split back on their own (``down_blocks_0`` and ``to_out_0`` hold ``_`` too),
so the file is read against its base: each base module's name flattened the same way says which it is
(``pipeline_names``: a pipeline's components, or a lone denoiser's folder, which takes the ``lora_unet_``
modules only). Keys for no module of the base are refused by name.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import IncompatibleError, UnsupportedError
from ...io.checkpoint import Checkpoint, Decoded, TensorInfo
from ...io.spool import SpoolWriter
from ...names import flux
from ..names import ROLE_A, ROLE_B, ROLE_MAGNITUDE, saved_key
from ..weights import LoraAdapter
from .base import AdapterFormat
from .pipeline_names import (
    CLIP_INNER,
    UNET_FILE_PREFIX,
    FileModule,
    PairsWriter,
    lora_of_pairs,
    module_aliases,
    pair,
    read_file,
    rows_of,
    split_component,
)

if TYPE_CHECKING:
    import torch

    from .registry import Probe
else:
    from ..._lazy import torch

# a key's prefix -> the pipeline components its modules are in, in the order asked (Flux's and SD3's
# denoiser is a transformer; SD 1.x's one text encoder is lora_te_, SDXL's two lora_te1_ / lora_te2_)
PREFIXES: dict[str, tuple[str, ...]] = {
    "lora_unet_": ("unet", "transformer"),
    "lora_transformer_": ("transformer",),  # OneTrainer's: a transformer's modules in diffusers' names
    "lora_te_": ("text_encoder",),
    "lora_te1_": ("text_encoder",),
    "lora_te2_": ("text_encoder_2",),
    "lora_te3_": ("text_encoder_3",),
}
PREFIXES_OF = {c: tuple(p for p, held in PREFIXES.items() if c in held) for cs in PREFIXES.values() for c in cs}
LEAVES = ("lora_down.weight", "lora_up.weight", "alpha")
# LyCORIS LoCon's leaves beside a LoRA pair (lycoris/modules/locon.py:30-36): a conv's Tucker core, DoRA's magnitude
MID, DORA = "lora_mid.weight", "dora_scale"
# LyCORIS's algorithms in the same files, under PEFT's part names (PEFT's LoHa and LoKr are LyCORIS's math)
LYCORIS = {
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
}
LABELS = {"loha": "LoHa", "lokr": "LoKr"}
# other trainers' leaves in the same files, named in the refusal: what each is
CLAIMED = (".lora_down.weight", *(f".{leaf}" for leaf in ("hada_w1_a", "lokr_w1", "lokr_w1_a")))
OTHER_LEAVES = {
    "diff": "a full weight difference (diff)",
    "diff_b": "a full bias difference (diff_b)",
    "w_norm": "LyCORIS's norm",
    "oft_blocks": "LyCORIS OFT",
    "oft_diag": "LyCORIS OFT",
}
WRITTEN = "lora"  # the file a kohya result folder holds: lora.safetensors
WRITTEN_PREFIX = {
    "unet": "lora_unet_",
    "transformer": "lora_transformer_",  # diffusers' names: lora_unet_ + them is no name ComfyUI maps (Flux, SD3)
    "text_encoder": "lora_te_",
    "text_encoder_2": "lora_te2_",
    "text_encoder_3": "lora_te3_",
}
SWAPPED = "lora_unet_final_layer_adaLN_modulation_1"  # Flux's, whose halves diffusers swaps (names.flux)
_DIFFUSERS_BLOCK = re.compile(r"^transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_KEY = re.compile(r"^(lora_(?:unet|transformer|te\d?)_[^.]+)\.(.+)$")
# an original single file's denoiser (SD's UNet under diffusion_model., Flux's blocks bare or under it): lora_unet_
ORIGINAL_DENOISER = (UNET_FILE_PREFIX, UNET_FILE_PREFIX.removeprefix("model."))


def claims(probe: Probe) -> bool:
    """A kohya LoRA: a lora_down key (or a LyCORIS LoHa / LoKr part) under a prefix of PREFIXES."""
    return any(k.startswith(tuple(PREFIXES)) and k.endswith(CLAIMED) for k in probe.names())


def read(path: Path) -> LoraAdapter:
    raise UnsupportedError(
        f"{path}: a kohya LoRA names modules with '.' written '_', which only the base model tells apart: "
        "give the base model (merge BASE ADAPTER, or --base BASE)"
    )


def read_with_base(path: Path, base: Checkpoint | None) -> LoraAdapter:
    """The kohya file at ``path`` as the common adapter, its modules named as ``base`` names them (no base: as
    the file names them, what inspect shows).

    Raises:
        UnsupportedError: another trainer's tensors in it (a full diff, OFT, DoRA on the input axis or on LoHa /
            LoKr, ...), by name.
        IncompatibleError: modules the base does not have, by name (a LoRA for another model).
    """
    return read_file(path, lambda ckpt: _read(path, ckpt, base))


def read_as_named(path: Path) -> LoraAdapter:
    """The file as the common adapter, its modules under the file's own names (inspect)."""
    return read_with_base(path, None)


def _read(path: Path, ckpt: Checkpoint, base: Checkpoint | None) -> LoraAdapter:
    found = {}
    for kohya, leaves in _modules(path, ckpt).items():
        alpha = leaves.pop("alpha", None)
        value = None if alpha is None else float(ckpt.read_info(alpha).item())
        found[kohya] = _module(path, kohya, leaves, value)
    where = _module_map(base) if base is not None else {}
    if base is not None:
        found, where = _split_fused(path, found, where, base)
    return lora_of_pairs(path, ckpt, base, found, where, lambda k: PREFIXES[_prefix(k)])


def _split_fused(
    path: Path, found: dict[str, FileModule], where: dict[str, str], base: Checkpoint
) -> tuple[dict[str, FileModule], dict[str, str]]:
    """A module of the file the base holds otherwise (Flux's original names against diffusers': ``img_mlp.0`` is
    ``ff.net.0.proj``, ``img_attn.qkv`` is ``to_q``, ``to_k``, ``to_v``): one LoRA per part, lora_down shared,
    each its block of lora_up's rows (the same ΔW, row for row). Others as they are."""
    fused = _fused_modules(base)
    if SWAPPED in found and SWAPPED not in where and fused:
        raise UnsupportedError(
            f"{path}: {SWAPPED}: Flux's final_layer.adaLN_modulation.1 is diffusers' norm_out.linear with its two "
            "halves of rows swapped, which is not merged into a diffusers transformer yet (an original-layout "
            "single file takes it as it is)"
        )
    split: dict[str, FileModule] = {}
    names = dict(where)
    for kohya, module in found.items():
        parts = fused.get(kohya) if kohya not in where else None
        if parts is None:
            split[kohya] = module
            continue
        if module.tuner != "lora":
            raise UnsupportedError(f"{path}: {kohya}: a fused module's {module.tuner} is not split into the base's")
        for target, start, stop, of in parts:  # DoRA's norm is per output row: its magnitude splits by rows too
            name = f"{kohya}[{target}]"
            rows = {role: rows_of(path, info, start, stop, of) for role, info in module.parts.items() if role != ROLE_A}
            split[name] = FileModule("lora", {ROLE_A: module.parts[ROLE_A], **rows}, module.rank, module.alpha)
            names[name] = target
    return split, names


def _fused_modules(base: Checkpoint) -> dict[str, list[tuple[str, int, int, int]]]:
    """kohya name of an original-layout module the base holds otherwise (names.flux: renamed, or as several) -> its
    parts there."""
    aliases = module_aliases(base)
    counts: dict[str, int] = {}
    for found_block in filter(None, map(_DIFFUSERS_BLOCK.match, aliases)):
        counts[found_block[1]] = max(counts.get(found_block[1], 0), int(found_block[2]) + 1)
    originals = [f"double_blocks.{n}.{k}" for n in range(counts.get("transformer_blocks", 0)) for k in flux.DOUBLE]
    singles = range(counts.get("single_transformer_blocks", 0))
    originals += [f"single_blocks.{n}.{k}" for n in singles for k in flux.SINGLE]
    originals += list(flux.GLOBAL) if counts else []
    found: dict[str, list[tuple[str, int, int, int]]] = {}
    for original in originals:
        parts = flux.diffusers_parts(original) or ()
        held = [(aliases[f"transformer.{p}"], a, b, of) for p, a, b, of in parts if f"transformer.{p}" in aliases]
        if parts and len(held) == len(parts):
            found["lora_unet_" + original.replace(".", "_")] = held
    return found


def _module(path: Path, kohya: str, leaves: dict[str, TensorInfo], alpha: float | None) -> FileModule:
    """One module's tensors as a LoRA pair (LyCORIS's LoCon: with its Tucker core, its DoRA magnitude), or LyCORIS's
    LoHa / LoKr parts (PEFT's names and math: its ``lycoris_utils``), its rank as LyCORIS takes it for the scale
    alpha / rank."""
    tuner = max(LYCORIS, key=lambda t: len(LYCORIS[t].intersection(leaves)))
    tuner = tuner if LYCORIS[tuner].intersection(leaves) else "lora"
    dora = leaves.pop(DORA, None)
    if tuner == "lora":
        return _locon(path, kohya, leaves, dora, alpha)
    if dora is not None:
        raise UnsupportedError(
            f"{path}: {kohya}: DoRA (dora_scale) on a LyCORIS {LABELS[tuner]} module, which PEFT's {LABELS[tuner]} "
            "has no form of (lorasurgeon reads DoRA on LoRA / LoCon modules only)"
        )
    stray = set(leaves) - LYCORIS[tuner]
    if stray:
        raise UnsupportedError(
            f"{path}: {kohya}: {tuner} parts with {', '.join(sorted(stray))}, which go with no {tuner}"
        )
    if tuner == "loha":
        return FileModule(tuner, leaves, leaves["hada_w1_b"].shape[0], alpha)
    factored = [leaves[k] for k in ("lokr_w2_b", "lokr_w1_b") if k in leaves]
    if not factored:  # both Kronecker factors whole: LyCORIS scales by 1, whatever alpha says
        return FileModule(tuner, leaves, 1, 1.0)
    return FileModule(tuner, leaves, factored[0].shape[0], alpha)


def _locon(
    path: Path, kohya: str, leaves: dict[str, TensorInfo], dora: TensorInfo | None, alpha: float | None
) -> FileModule:
    """A LoRA pair, lora_down contracted with LoCon's Tucker core where there is one, and DoRA's magnitude."""
    if set(leaves) - {MID} != {"lora_down.weight", "lora_up.weight"}:
        raise IncompatibleError(f"{path}: {kohya} has {', '.join(sorted(leaves))}: lora_down and lora_up go together")
    down, up = leaves["lora_down.weight"], leaves["lora_up.weight"]
    if MID in leaves:
        down = _tucker_down(path, kohya, down, leaves[MID], up)
    module = pair(down, up, alpha)
    if dora is None:
        return module
    parts = {**module.parts, ROLE_MAGNITUDE: _magnitude(path, kohya, dora, up.shape[0], down.shape)}
    return dataclasses.replace(module, parts=parts)


def _tucker_down(path: Path, kohya: str, down: TensorInfo, mid: TensorInfo, up: TensorInfo) -> TensorInfo:
    """LoCon's Tucker conv (lycoris/modules/locon.py:92-97: lora_down [r, in, 1, 1], lora_mid [r, r, kh, kw], lora_up
    [out, r, 1, 1]) as PEFT's conv LoRA: ΔW = up · (mid ×₂ down) (functional/locon.py:50-51, general.py:12-14), so
    lora_A [r, in, kh, kw] = Σ_j mid[i, j] · down[j, q], computed in float32 when read."""
    r = mid.shape[0]
    if (
        len(mid.shape) < 3
        or len(down.shape) != len(mid.shape)
        or any(k != 1 for k in (*down.shape[2:], *up.shape[2:]))
        or (mid.shape[1], down.shape[0], up.shape[1]) != (r, r, r)
    ):
        raise IncompatibleError(
            f"{path}: {kohya}: LyCORIS LoCon's Tucker (lora_mid) {list(mid.shape)} with lora_down {list(down.shape)} "
            f"and lora_up {list(up.shape)} is not its layout ([r, r, kh, kw] between [r, in, 1, 1] and [out, r, 1, 1])"
        )
    shape = (r, down.shape[1], *mid.shape[2:])
    return TensorInfo(down.name, "F32", shape, down.file, None, decoded=Decoded((mid, down), _tucker))


def _tucker(parts: list[torch.Tensor]) -> torch.Tensor:
    mid, down = (p.to(torch.float32) for p in parts)
    return torch.einsum("ij...,jq->iq...", mid, down.flatten(1)).contiguous()


def _magnitude(path: Path, kohya: str, dora: TensorInfo, out: int, a_shape: tuple[int, ...]) -> TensorInfo:
    """LyCORIS's ``dora_scale`` as PEFT's magnitude, where it is one: W' = (W0 + ΔW) · m / (‖W0 + ΔW‖ + eps)
    (functional/general.py:117-139), the norm over each output row when made with ``wd_on_out`` ([out, 1, ...],
    modules/locon.py:119-126), as PEFT's DoRA without its eps; stored as PEFT stores it: [out] for a Linear,
    [1, out, 1, ...] for a conv (peft/tuners/lora/dora.py:90, :212)."""
    n = len(dora.shape)
    if len(a_shape) == n and dora.shape == (out, *[1] * (n - 1)):
        return dataclasses.replace(dora, shape=(out,) if n == 2 else (1, out, *[1] * (n - 2)))
    if len(a_shape) == n and dora.shape == (1, a_shape[1], *[1] * (n - 2)):
        raise UnsupportedError(
            f"{path}: {kohya}: DoRA (dora_scale) {list(dora.shape)} normalised over the input axis (LyCORIS's "
            "wd_on_out=False), which PEFT's DoRA, one magnitude per output unit, cannot hold"
        )
    raise IncompatibleError(
        f"{path}: {kohya}: DoRA (dora_scale) {list(dora.shape)} is one value per neither output nor input unit of "
        f"a weight of {out} outputs and lora_down {list(a_shape)}"
    )


def _prefix(kohya: str) -> str:
    return next(p for p in PREFIXES if kohya.startswith(p))


def _modules(path: Path, ckpt: Checkpoint) -> dict[str, dict[str, TensorInfo]]:
    """The file's modules (their kohya names) -> leaf -> tensor; another trainer's leaf refused by name."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    for info in ckpt.infos():
        found = _KEY.match(info.name)
        if found is None or not found[1].startswith(tuple(PREFIXES)):
            raise UnsupportedError(f"{path}: tensor {info.name!r} is not a kohya LoRA key (lora_unet_*, lora_te*_*)")
        module, leaf = found[1], found[2]
        if leaf not in (*LEAVES, MID, DORA) and not any(leaf in parts for parts in LYCORIS.values()):
            what = OTHER_LEAVES.get(leaf, f"a tensor kohya's LoRA does not hold ({leaf})")
            raise UnsupportedError(f"{path}: {module}: {what}, which lorasurgeon does not read in kohya files yet")
        parts.setdefault(module, {})[leaf] = info
    return parts


def _module_map(base: Checkpoint) -> dict[str, str]:
    """kohya name -> the base's module, for every name the base's modules may go by (pipeline_names)."""
    found: dict[str, str] = {}
    for alias, module in module_aliases(base).items():
        component, _, inner = alias.partition(".")
        for prefix in PREFIXES_OF.get(component, ()):
            found[prefix + inner.replace(".", "_")] = module
    return found


class KohyaWriter(PairsWriter):
    """A kohya LoRA file as sd-scripts writes it (one .safetensors of lora_unet_* / lora_te*_* keys, lora_down,
    lora_up and a float32 .alpha = scale · rank per module), in the result folder; ComfyUI and Forge load it."""

    format_words = "a kohya LoRA"

    def __init__(self, out: str | os.PathLike[str], overwrite: bool = False):
        super().__init__(out, overwrite, prefix=WRITTEN)

    def name_pairs(self, scales: Mapping[str, tuple[int, float]]) -> None:
        two = any(m.startswith("text_encoder_2.") for m in scales)  # SDXL: lora_te1_ / lora_te2_
        names: dict[str, str] = {}
        for module, (rank, scale) in scales.items():
            try:
                kohya = kohya_name(module, two)
            except UnsupportedError as exc:
                raise UnsupportedError(f"{self.out}: {exc}") from None
            names |= {
                saved_key(module, ROLE_A): f"{kohya}.lora_down.weight",
                saved_key(module, ROLE_B): f"{kohya}.lora_up.weight",
            }
            self.write_alpha(f"{kohya}.alpha", scale * rank)
        self.rename(names)

    def write_alpha(self, name: str, alpha: float) -> None:
        SpoolWriter.write(self, name, torch.tensor(alpha, dtype=torch.float32))


def kohya_name(module: str, two_encoders: bool) -> str:
    """The kohya name of a pipeline module (``unet.down_blocks.0...to_q`` -> ``lora_unet_down_blocks_0_..._to_q``;
    CLIP's under ``text_model``, as kohya's); a module of no pipeline component is refused by name."""
    split = split_component(module, list(WRITTEN_PREFIX))
    original = _original_denoiser(module)
    if split is None and original is not None:
        return "lora_unet_" + original.replace(".", "_")
    if split is None:
        raise UnsupportedError(
            f"module {module!r} names no pipeline component ({', '.join(WRITTEN_PREFIX)}): a kohya LoRA names "
            "each module under its component (convert a diffusion pipeline's adapter)"
        )
    component, inner = split
    prefix = WRITTEN_PREFIX[component]
    if component == "text_encoder" and two_encoders:
        prefix = "lora_te1_"
    if component.startswith("text_encoder") and not inner.startswith(CLIP_INNER):
        inner = CLIP_INNER + inner
    return prefix + inner.replace(".", "_")


def _original_denoiser(module: str) -> str | None:
    """The name below ``diffusion_model.`` of a module of an original single file's denoiser (kohya's and
    ComfyUI's lora_unet_ names), or None."""
    for prefix in ORIGINAL_DENOISER:
        if module.startswith(prefix):
            return module.removeprefix(prefix)
    return module if module.partition(".")[0] in flux.TOP else None


FORMAT = AdapterFormat(
    name="kohya",
    holds="kohya LoRA (lora_unet_* / lora_te*_* .safetensors)",
    claims=claims,
    read=read,
    read_with_base=read_with_base,
    read_as_named=read_as_named,
    written_back=True,
    writer=KohyaWriter,
)
