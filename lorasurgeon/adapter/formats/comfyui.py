"""ComfyUI's own LoRA files: what its "Extract and Save Lora" node writes (``comfy_extras/nodes_lora_extract.py``,
``calc_lora_model``): every module under ComfyUI's in-memory name -- the denoiser's original-layout names below
``diffusion_model.`` (``diffusion_model.input_blocks.4.1.proj_in``, Flux's ``diffusion_model.double_blocks.0...``),
the text encoders below ``text_encoders.clip_l.`` / ``text_encoders.clip_g.`` (``...transformer.text_model...``)
-- with ``.lora_up.weight`` ([out, r] or [out, r, 1, 1]) and ``.lora_down.weight``, no alpha (ComfyUI's loader
then scales by 1, ``comfy/weight_adapter/lora.py``), an ``.alpha`` read where a file has one. Its ``.diff`` /
``.diff_b`` leaves (whole weight and bias changes, its "full_diff" type and ``bias_diff``) are refused by name.

Read against the base like kohya's (``pipeline_names``): ``diffusion_model.X`` is the base's module the original
name X stands for (a single file's own, or a diffusers UNet's named back), a text encoder's its CLIP module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import IncompatibleError, UnsupportedError
from ...io.checkpoint import Checkpoint, TensorInfo
from ..weights import LoraAdapter
from .base import AdapterFormat
from .pipeline_names import FileModule, lora_of_pairs, module_aliases, pair, read_file

if TYPE_CHECKING:
    from .registry import Probe

DENOISER = "diffusion_model."
# ComfyUI's text encoders (its CLIP state dicts' prefixes) -> the pipeline component each is
ENCODERS = {"text_encoders.clip_l.transformer.": "text_encoder", "text_encoders.clip_g.transformer.": "text_encoder_2"}
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
OTHERS = {".diff": "a whole weight change (.diff)", ".diff_b": "a whole bias change (.diff_b)"}


def claims(probe: Probe) -> bool:
    """ComfyUI's LoRA: a lora_down key under diffusion_model. or text_encoders."""
    return any(k.startswith((DENOISER, "text_encoders.")) and k.endswith(DOWN) for k in probe.names())


def read(path: Path) -> LoraAdapter:
    raise UnsupportedError(
        f"{path}: a ComfyUI LoRA names modules as ComfyUI holds the model, which only the base model maps: give the "
        "base model (merge BASE ADAPTER, or --base BASE)"
    )


def read_with_base(path: Path, base: Checkpoint | None) -> LoraAdapter:
    """The ComfyUI file at ``path`` as the common adapter, its modules named as ``base`` names them (no base: as
    the file names them, what inspect shows).

    Raises:
        UnsupportedError: whole-tensor changes (.diff) and other leaves, by name.
        IncompatibleError: modules the base does not have, a down without its up, by name.
    """
    where = _module_map(base) if base is not None else {}
    return read_file(path, lambda ckpt: lora_of_pairs(path, ckpt, base, _pairs(path, ckpt), where, _components))


def read_as_named(path: Path) -> LoraAdapter:
    """The file as the common adapter, its modules under the file's own names (inspect)."""
    return read_with_base(path, None)


def _pairs(path: Path, ckpt: Checkpoint) -> dict[str, FileModule]:
    infos: dict[str, TensorInfo] = {i.name: i for i in ckpt.infos()}
    pairs: dict[str, FileModule] = {}
    used: set[str] = set()
    for name, info in infos.items():
        if not name.endswith(DOWN):
            continue
        module = name.removesuffix(DOWN)
        if module + UP not in infos:
            raise IncompatibleError(f"{path}: {name} has no {module + UP}: lora_down and lora_up go together")
        alpha = infos.get(module + ALPHA)
        value = None if alpha is None else float(ckpt.read_info(alpha).item())
        used |= {name, module + UP, module + ALPHA}
        pairs[module] = pair(info, infos[module + UP], value)
    for name in sorted(infos.keys() - used):
        what = next((w for s, w in OTHERS.items() if name.endswith(s)), "not a LoRA factor of ComfyUI's")
        raise UnsupportedError(f"{path}: {name}: {what}, which lorasurgeon does not read in ComfyUI files yet")
    return pairs


def _pipeline_names(module: str) -> list[str]:
    """The pipeline-style names (module_aliases') a ComfyUI module name may stand for."""
    if module.startswith(DENOISER):
        inner = module.removeprefix(DENOISER)
        return [f"unet.{inner}", f"transformer.{inner}"]
    for prefix, component in ENCODERS.items():
        if module.startswith(prefix):
            return [f"{component}.{module.removeprefix(prefix)}"]
    return []


def _components(module: str) -> tuple[str, ...]:
    """The pipeline components a ComfyUI module may be in; one ComfyUI has that no pipeline component is mapped
    from (Flux's and SD3's t5xxl) by ComfyUI's own name, for the refusal."""
    found = tuple(name.partition(".")[0] for name in _pipeline_names(module))
    return found or (".".join(module.split(".")[:2]),)


def _module_map(base: Checkpoint) -> dict[str, str]:
    """ComfyUI name -> the base's module, for every name the base's modules may go by."""
    aliases = module_aliases(base)
    found: dict[str, str] = {}
    for alias, module in aliases.items():
        component, _, inner = alias.partition(".")
        if component in ("unet", "transformer"):
            found[DENOISER + inner] = module
        for prefix, held in ENCODERS.items():
            if component == held:
                found[prefix + inner] = module
    return found


FORMAT = AdapterFormat(
    name="comfyui",
    holds="ComfyUI LoRA (diffusion_model.* / text_encoders.* with lora_down / lora_up)",
    claims=claims,
    read=read,
    read_with_base=read_with_base,
    read_as_named=read_as_named,
)
