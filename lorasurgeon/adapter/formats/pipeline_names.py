"""The names diffusion LoRA formats give a base's modules, each turned to the base's own, and the common
adapter made of a file's factors: what the kohya and diffusers readers share.

A diffusion LoRA names modules as a pipeline holds them -- ``unet.down_blocks.0...to_q`` in diffusers' files,
``lora_unet_down_blocks_0_..._to_q`` in kohya's -- and the text encoder as transformers 4 did
(``text_model.encoder.layers.0...``). A base is a pipeline folder (``io.pipeline``: its tensors named
``<component>.<name>``) or a lone denoiser's folder (a UNet's or transformer's, its tensors under their own
names); transformers 5 saves CLIP without ``text_model.``. :func:`module_aliases` gives every name a file may
use for each of the base's modules.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ...errors import AdapterConfigError, IncompatibleError, UnsupportedError
from ...io.checkpoint import Checkpoint, FileSlice, TensorInfo, open_checkpoint
from ...io.dtypes import itemsize
from ...io.spool import SpoolWriter
from ...words import plural
from ..config import AdapterConfig
from ..names import ROLE_A, ROLE_B, ROLE_MAGNITUDE, SAVED_PREFIX, Role, saved_key, split_saved_key
from ..weights import LoraAdapter, adapter_from

if TYPE_CHECKING:
    import torch

DENOISERS = ("unet", "transformer")  # the component a lone model folder is taken to be
CLIP_INNER = "text_model."  # CLIPTextModel's inner module: in LoRA files' names, not in transformers 5's files
UNET_FILE_PREFIX = "model.diffusion_model."  # a single file's denoiser (SD's, and Flux's as ComfyUI saves it)


def weight_modules(base: Checkpoint) -> set[str]:
    """The modules of ``base`` holding a weight (a LoRA's targets), by their in-memory names (``names``: a
    single-file checkpoint's are a pipeline's)."""
    return {n.rpartition(".")[0] for n in _memory_names(base) if n.endswith(".weight")}


def _memory_names(base: Checkpoint) -> list[str]:
    from ...io.sidecar import read_config
    from ...names import model_names

    names = model_names(base.names(), read_config(base))
    return [*names.file_of, *names.row_blocks]


def _pipeline_named(base: Checkpoint, modules: set[str]) -> bool:
    """Whether the base's modules are named under pipeline components (a pipeline, a single-file checkpoint)."""
    return base.format == "pipeline" or any(m.startswith(("unet.", "transformer.")) for m in modules)


def module_aliases(base: Checkpoint) -> dict[str, str]:
    """Every pipeline-style name (``<component>.<module>``) a LoRA file may give a module of ``base`` -> the
    base's own (in-memory) name for it; CLIP's with and without ``text_model.``."""
    found: dict[str, str] = {}
    modules = weight_modules(base)
    pipeline = _pipeline_named(base, modules)
    for module in modules:
        if not pipeline:
            found.update((f"{d}.{module}", module) for d in DENOISERS)
            continue
        found[module] = module
        component, _, inner = module.partition(".")
        if component.startswith("text_encoder"):
            other = inner.removeprefix(CLIP_INNER) if inner.startswith(CLIP_INNER) else CLIP_INNER + inner
            found[f"{component}.{other}"] = module
    return _original_names(base, modules) | found


def _original_names(base: Checkpoint, modules: set[str]) -> dict[str, str]:
    """The denoiser's modules under its original names (a kohya SDXL file's ``input_blocks_4_1_...``, a kohya Flux
    file's ``double_blocks_0_img_attn_qkv``): a single file's own keys (which the merge plan takes as they are),
    or a diffusers UNet's named back (``names.ldm_unet``)."""
    from ...names.ldm_unet import ldm_unet_keys

    found: dict[str, str] = {}
    pipeline = base.format == "pipeline"
    if not pipeline:
        for name in base.names():
            module = name.rpartition(".")[0]
            if name.endswith(".weight") and module not in modules:
                found.update((f"{d}.{module.removeprefix(UNET_FILE_PREFIX)}", module) for d in DENOISERS)
    inner = "unet." if pipeline else ""
    unet = [n.removeprefix(inner) for n in base.names() if n.startswith(inner)]
    for name, key in (ldm_unet_keys(unet, prefix="") or {}).items():
        module = f"{inner}{name.rpartition('.')[0]}"
        if name.endswith(".weight") and module in modules:
            found.update((f"{d}.{key.rpartition('.')[0]}", module) for d in (("unet",) if pipeline else DENOISERS))
    return found


# a lone denoiser's module names (no component before them) -> the component they are: diffusers' block names
LONE_DENOISER = (
    (("transformer_blocks.", "single_transformer_blocks."), "transformer"),
    (("down_blocks.", "mid_block.", "up_blocks."), "unet"),
)


def split_component(module: str, known: Sequence[str]) -> tuple[str, str] | None:
    """(component, module within it) of an adapter's module: the component it is named under (one of
    ``known``), or, for a lone denoiser's module, the one its diffusers block names say (None: neither)."""
    component, _, inner = module.partition(".")
    if component in known and inner:
        return component, inner
    return next(((c, module) for starts, c in LONE_DENOISER if module.startswith(starts) and c in known), None)


def components_of(base: Checkpoint) -> set[str]:
    """The components ``base`` holds weights of (a lone model folder: the denoiser's)."""
    modules = weight_modules(base)
    if not _pipeline_named(base, modules):
        return set(DENOISERS)
    return {m.partition(".")[0] for m in modules}


@dataclass(frozen=True)
class FileModule:
    """One module of a diffusion LoRA file: its tuner ("lora", or LyCORIS's "loha" / "lokr", PEFT's tuners of
    the same math), its tensors by PEFT's part names (a LoRA's "A" and "B": ROLE_A, ROLE_B; DoRA's ROLE_MAGNITUDE),
    its rank and its alpha (None: the rank, a scale of 1)."""

    tuner: str
    parts: Mapping[str, TensorInfo]
    rank: int
    alpha: float | None


def rows_of(path: Path, info: TensorInfo, start: int, stop: int, of: int) -> TensorInfo:
    """A block of a tensor's rows, rows·start/of to rows·stop/of, as a tensor of its own, read where it lies."""
    if info.offset is None or info.decoded is not None:
        raise UnsupportedError(f"{path}: {info.name} is split by rows, which only a .safetensors file is read in")
    rows = info.shape[0]
    first, end = rows * start // of, rows * stop // of
    step = math.prod(info.shape[1:]) * itemsize(info.dtype_name)
    shape = (end - first, *info.shape[1:])
    return dataclasses.replace(info, offset=info.offset + first * step, shape=shape, key=info.file_key)


def pair(down: TensorInfo, up: TensorInfo, alpha: float | None) -> FileModule:
    """A LoRA module: down (PEFT's lora_A), up (lora_B)."""
    return FileModule("lora", {ROLE_A: down, ROLE_B: up}, down.shape[0], alpha)


def read_file(path: Path, build: Callable[[Checkpoint], LoraAdapter]) -> LoraAdapter:
    """The adapter ``build`` makes of the file at ``path``, opened here; closed again if ``build`` raises (an
    adapter that is made keeps it open: it reads its tensors from there)."""
    ckpt = open_checkpoint(path)
    try:
        return build(ckpt)
    except BaseException:
        ckpt.close()
        raise


def lora_of_pairs(
    path: Path,
    ckpt: Checkpoint,
    base: Checkpoint | None,
    found: Mapping[str, FileModule],
    where: Mapping[str, str],
    components: Callable[[str], tuple[str, ...]],
) -> LoraAdapter:
    """The common adapter of a file's modules (its own module name -> tensors), each named as ``base`` names it
    (``where``: a file name -> the base's; no base: under the file's own names). A module the base lacks is
    refused by name: as one of a component the base does not hold (``components``: the components a file name
    may be in), or as a LoRA for another model; a file of two tuners, or of DoRA on some modules only, is refused."""
    if base is None:
        where = {k: k for k in found}
    else:
        _check_found(path, base, found, where, components)
    tuners = sorted({m.tuner for m in found.values()})
    if len(tuners) != 1:
        raise UnsupportedError(f"{path}: modules of {' and '.join(tuners) or 'no tuner'}: one adapter holds one kind")
    plain = [k for k, m in found.items() if ROLE_MAGNITUDE not in m.parts]
    if plain and len(plain) < len(found):
        raise UnsupportedError(
            f"{path}: DoRA on {len(found) - len(plain)} of its {len(found)} modules, not on {plain[0]}: PEFT's "
            "use_dora is one setting for every module of an adapter"
        )
    infos: list[TensorInfo] = []
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for own, m in found.items():
        module = where[own]
        ranks[module] = m.rank
        alphas[module] = float(m.rank) if m.alpha is None else m.alpha
        for part, info in m.parts.items():
            key = saved_key(module, cast(Role, part)) if m.tuner == "lora" else f"{SAVED_PREFIX}{module}.{part}"
            infos.append(dataclasses.replace(info, name=key, key=info.file_key))  # a computed one stays computed
    view = Checkpoint(ckpt.root, ckpt.format, list(ckpt.files), infos, ckpt.metadata)
    return adapter_from(path, AdapterConfig.from_dict(_config(tuners[0], ranks, alphas, not plain)), view)


def _check_found(
    path: Path,
    base: Checkpoint,
    pairs: Mapping[str, FileModule],
    where: Mapping[str, str],
    components: Callable[[str], tuple[str, ...]],
) -> None:
    """Every module of ``pairs`` has a name in ``where``, or the refusal names the first that has not."""
    missing = sorted(k for k in pairs if k not in where)
    if missing and len(missing) == len(pairs):
        raise IncompatibleError(
            f"{path}: none of its {len(pairs)} modules ({missing[0]}, ...) is in {base.root}: a LoRA for another "
            "model? (a kohya or diffusers LoRA goes with the diffusion pipeline, or single file, it was made for)"
        )
    held = components_of(base)
    elsewhere = [k for k in missing if not held.intersection(components(k))]
    if elsewhere:
        wanted = sorted({components(k)[0] for k in elsewhere})
        raise IncompatibleError(
            f"{path}: {plural(len(elsewhere), 'module')} of it ({elsewhere[0]}, ...) are for the "
            f"{', '.join(wanted)}, which {base.root} does not hold: give the whole pipeline's folder "
            "(model_index.json)"
        )
    if missing:
        raise IncompatibleError(
            f"{path}: {len(missing)} of its {len(pairs)} modules name no module of {base.root} "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): a LoRA for another model?"
        )


def _config(tuner: str, ranks: dict[str, int], alphas: dict[str, float], dora: bool) -> dict[str, object]:
    """PEFT's config of the file (LoraConfig, LoHaConfig, LoKrConfig): the commonest rank and alpha, and each
    module that differs as a pattern of its own (PEFT's rank_pattern / alpha_pattern, the full name escaped);
    ``use_dora`` when its modules hold DoRA's magnitudes."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": tuner.upper(),
        "r": rank,
        "lora_alpha" if tuner == "lora" else "alpha": alpha,
        "target_modules": sorted({m.rpartition(".")[2] for m in ranks}),
        "rank_pattern": {re.escape(m): r for m, r in sorted(ranks.items()) if r != rank},
        "alpha_pattern": {re.escape(m): a for m, a in sorted(alphas.items()) if a != alpha},
        "use_dora": dora,
        "use_rslora": False,
        "bias": "none",
        "inference_mode": True,
    }


# (a module name of the LoRA file holds it, the family): the first that matches names the family
FAMILIES = (
    ("double_blocks", "Flux.1"),
    ("single_transformer_blocks", "Flux.1"),
    ("context_embedder", "SD3"),
    ("lora_te2_", "SDXL"),
    ("text_encoder_2.", "SDXL"),
    ("add_embedding", "SDXL"),
    ("input_blocks", "SD 1.x / SDXL (original layout)"),
    ("down_blocks", "SD 1.x"),
)


def family_of(modules: Iterable[str]) -> str | None:
    """The model family a diffusion LoRA's module names say it is for (None: they say none)."""
    names = list(modules)
    return next((family for part, family in FAMILIES if any(part in m for m in names)), None)


def touched(modules: Iterable[str]) -> dict[str, int]:
    """How many modules a diffusion LoRA changes in each part of the pipeline: its component (``unet``,
    ``text_encoder``), or a kohya name's prefix (``lora_unet``, ``lora_te1``)."""
    counts: Counter[str] = Counter()
    for m in modules:
        kohya = re.match(r"^(lora_[a-z]+\d?)_", m)
        counts[kohya[1] if kohya and "." not in m else m.partition(".")[0]] += 1
    return dict(sorted(counts.items()))


class PairsWriter(SpoolWriter):
    """What the kohya and diffusers writers share: LoRA pairs under PEFT's saved names, spooled; at ``finish``
    each module's rank and scale from the PEFT config, then the tensors renamed as the format names them
    (``name_pairs``, a subclass's) and the folder published whole. Anything but LoRA pairs is refused."""

    format_words = "a diffusion LoRA"

    def __init__(self, out: str | os.PathLike[str], overwrite: bool = False, *, prefix: str):
        super().__init__(out, prefix=prefix, overwrite=overwrite)
        self._modules: dict[str, dict[Role, tuple[int, ...]]] = {}

    def write(self, name: str, tensor: torch.Tensor | FileSlice) -> None:
        module, role = split_saved_key(name)
        if role not in (ROLE_A, ROLE_B):
            what = "a whole tensor (modules_to_save, a bias)" if role is None else f"PEFT's {role} tensor"
            raise UnsupportedError(f"{self.out}: {name}: {what}; {self.format_words} holds LoRA pairs only")
        self._modules.setdefault(module, {})[cast(Role, role)] = tuple(tensor.shape)
        super().write(name, tensor)

    @classmethod
    def refusal(cls, config: Mapping[str, Any]) -> str | None:
        """Why the format cannot hold an adapter of this PEFT config, from headers (None: it can)."""
        peft = AdapterConfig.from_dict(config)
        bad = peft.unsupported() + [f for f in peft.features() if f in ("dora", "lora_bias", "trainable_tokens")]
        if peft.tuner is not None or bad:
            return f"{cls.format_words} holds plain LoRA pairs, not {', '.join(bad) or peft.peft_type}"
        return None

    def finish(self, config: Mapping[str, Any]) -> Path:
        why = self.refusal(config)
        if why is not None:
            raise UnsupportedError(f"{self.out}: {why}")
        peft = AdapterConfig.from_dict(config)
        scales: dict[str, tuple[int, float]] = {}
        for module, roles in self._modules.items():
            if ROLE_A not in roles or ROLE_B not in roles:
                raise AdapterConfigError(f"{self.out}: module {module!r} has no lora_A or no lora_B")
            rank = roles[ROLE_A][0]
            scales[module] = (rank, peft.scale(module, rank))
        if not scales:
            raise UnsupportedError(f"{self.out}: no LoRA pairs to write as {self.format_words}")
        self.name_pairs(scales)
        return self.commit()

    def name_pairs(self, scales: Mapping[str, tuple[int, float]]) -> None:
        """Rename the spooled pairs as the format names them, and add what it holds beside them (its alphas):
        ``scales``: module -> (rank, PEFT's scale)."""
        raise NotImplementedError
