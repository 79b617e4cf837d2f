"""diffusers' LoRA format (``save_lora_weights``: ``pytorch_lora_weights.safetensors``; what its training
scripts, ai-toolkit and the Hub's diffusers LoRAs hold): one .safetensors whose keys are the pipeline's module
names under their component (``unet.``, ``transformer.``, ``text_encoder.``, ``text_encoder_2.``), each
module's factors under one of the suffixes diffusers has written over the years (PEFT's ``lora_A`` /
``lora_B``; ``lora.down`` / ``lora.up`` for the attention projections and ``lora_linear_layer.down`` / ``.up``
for the text encoders, which ``convert_state_dict_to_diffusers`` still writes). Its alpha is, per component,
the LoraConfig diffusers keeps in the header (``lora_adapter_metadata``: ``unet.lora_alpha``,
``unet.alpha_pattern``, ...), else a ``<module>.alpha`` key (a converted kohya file), else the rank --
``get_peft_kwargs``' rule, a scale of 1.

Read against the base (``pipeline_names``): a pipeline's components as they are named, a lone denoiser's
folder taking the ``unet.`` / ``transformer.`` modules, CLIP with or without ``text_model.``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import AdapterConfigError, IncompatibleError, UnsupportedError
from ...io.checkpoint import Checkpoint, TensorInfo
from ..config import pattern_key
from ..names import ROLE_A, ROLE_B, saved_key
from ..weights import LoraAdapter
from .base import AdapterFormat
from .pipeline_names import FileModule, PairsWriter, lora_of_pairs, module_aliases, pair, read_file, split_component

if TYPE_CHECKING:
    from .registry import Probe

FILE = "pytorch_lora_weights.safetensors"  # save_lora_weights' default name
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")
DOWN = (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")  # each one's up is UP[i]
UP = (".lora_B.weight", ".lora.up.weight", ".lora_linear_layer.up.weight")
ALPHA = ".alpha"
# what else such files hold, named in the refusal
OTHERS = {
    ".lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    ".lora_B.bias": "a trained lora_B bias",
    "_lora.down.weight": "diffusers' pre-PEFT attention-processor LoRA (to_q_lora)",
    "_lora.up.weight": "diffusers' pre-PEFT attention-processor LoRA (to_q_lora)",
}


def claims(probe: Probe) -> bool:
    """A diffusers LoRA: a key under a pipeline component ending in one of diffusers' lora_A suffixes."""
    return any(k.partition(".")[0] in COMPONENTS and k.endswith(DOWN) for k in probe.names())


def read(path: Path) -> LoraAdapter:
    raise UnsupportedError(
        f"{path}: a diffusers LoRA names its modules as the pipeline does: give the base model (merge BASE "
        "ADAPTER, or --base BASE)"
    )


def read_with_base(path: Path, base: Checkpoint | None) -> LoraAdapter:
    """The diffusers LoRA at ``path`` (a file, or a folder holding pytorch_lora_weights.safetensors) as the
    common adapter, its modules named as ``base`` names them.

    Raises:
        UnsupportedError: what it holds beside LoRA factors (DoRA, lora_B biases, the pre-PEFT format), by name.
        AdapterConfigError: lora_adapter_metadata that is not diffusers'. IncompatibleError: modules the base
            does not have, or a down without its up, by name.
    """
    where = module_aliases(base) if base is not None else {}

    def build(ckpt: Checkpoint) -> LoraAdapter:
        pairs = _pairs(path, ckpt, _metadata(path, ckpt.metadata))
        return lora_of_pairs(path, ckpt, base, pairs, where, lambda k: (k.partition(".")[0],))

    return read_file(path, build)


def read_as_named(path: Path) -> LoraAdapter:
    """The file as the common adapter, its modules under the file's own names (inspect)."""
    return read_with_base(path, None)


def _pairs(path: Path, ckpt: Checkpoint, configs: Mapping[str, dict[str, Any]]) -> dict[str, FileModule]:
    """Each module's down and up, and its alpha (the metadata's, an .alpha key's, else None: the rank)."""
    infos = {i.name: i for i in ckpt.infos()}
    pairs: dict[str, FileModule] = {}
    used: set[str] = set()
    for name, info in infos.items():
        suffix = next((s for s in DOWN if name.endswith(s)), None)
        if suffix is None:
            continue
        module = name.removesuffix(suffix)
        up_name = module + UP[DOWN.index(suffix)]
        if up_name not in infos:
            raise IncompatibleError(f"{path}: {name} has no {up_name}: down and up go together")
        used |= {name, up_name}
        pairs[module] = pair(info, infos[up_name], _alpha(ckpt, module, infos, configs, used))
    for name in infos.keys() - used:
        what = next((w for s, w in OTHERS.items() if name.endswith(s) or s in name), None)
        raise UnsupportedError(
            f"{path}: {name}: {what or 'not a diffusers LoRA factor'}, which lorasurgeon does not read in "
            "diffusers files yet"
        )
    return pairs


def _alpha(
    ckpt: Checkpoint,
    module: str,
    infos: Mapping[str, TensorInfo],
    configs: Mapping[str, dict[str, Any]],
    used: set[str],
) -> float | None:
    component, _, inner = module.partition(".")
    config = configs.get(component)
    if config is not None:  # PEFT's own rule: the first alpha_pattern key matching, else lora_alpha
        patterns = config.get("alpha_pattern") or {}
        key = pattern_key(patterns, inner)
        alpha = patterns[key] if key is not None else config.get("lora_alpha")
        return None if alpha is None else float(alpha)
    if module + ALPHA in infos:
        used.add(module + ALPHA)
        return float(ckpt.read_info(infos[module + ALPHA]).item())
    return None


def _metadata(path: Path, header: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """lora_adapter_metadata of the header, per component: {"unet": {"r": 4, "lora_alpha": 8, ...}}."""
    raw = header.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AdapterConfigError(f"{path}: {METADATA_KEY} in its header is not JSON ({exc.msg})") from None
    if not isinstance(flat, dict):
        raise AdapterConfigError(f"{path}: {METADATA_KEY} in its header is not a JSON object")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = str(key).partition(".")
        configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        if config.get("use_rslora") or config.get("use_dora"):
            what = "rsLoRA" if config.get("use_rslora") else "DoRA"
            raise UnsupportedError(
                f"{path}: {component}'s {what}, which lorasurgeon does not read in diffusers files yet"
            )
    return configs


class DiffusersWriter(PairsWriter):
    """A diffusers LoRA as ``save_lora_weights`` writes it: pytorch_lora_weights.safetensors, PEFT's lora_A /
    lora_B under ``<component>.<module>``, each component's LoraConfig in the header's lora_adapter_metadata
    (its rank and alpha, and each module that differs as an escaped pattern), so ``load_lora_weights`` scales
    every module as it was."""

    format_words = "a diffusers LoRA"

    def __init__(self, out: str | os.PathLike[str], overwrite: bool = False):
        super().__init__(out, overwrite, prefix=FILE.removesuffix(".safetensors"))

    def name_pairs(self, scales: Mapping[str, tuple[int, float]]) -> None:
        names: dict[str, str] = {}
        ranks: dict[str, dict[str, int]] = {}
        alphas: dict[str, dict[str, float]] = {}
        for module, (rank, scale) in scales.items():
            split = split_component(module, COMPONENTS)
            if split is None:
                raise UnsupportedError(
                    f"{self.out}: module {module!r} names no pipeline component ({', '.join(COMPONENTS[:3])}, ...): "
                    "a diffusers LoRA names each module under its component (convert from a pipeline's adapter)"
                )
            component, inner = split
            ranks.setdefault(component, {})[inner] = rank
            alphas.setdefault(component, {})[inner] = scale * rank
            names[saved_key(module, ROLE_A)] = f"{component}.{inner}{DOWN[0]}"
            names[saved_key(module, ROLE_B)] = f"{component}.{inner}{UP[0]}"
        self.rename(names)
        metadata: dict[str, Any] = {}
        for component in ranks:
            metadata |= {
                f"{component}.{k}": v for k, v in _component_config(ranks[component], alphas[component]).items()
            }
        self.metadata = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}


def _component_config(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """One component's LoraConfig fields, as diffusers reads them back (lora_config_kwargs)."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(m): r for m, r in sorted(ranks.items()) if r != rank},
        "alpha_pattern": {re.escape(m): a for m, a in sorted(alphas.items()) if a != alpha},
        "target_modules": sorted(ranks),
        "use_dora": False,
        "use_rslora": False,
        "lora_bias": False,
    }


FORMAT = AdapterFormat(
    name="diffusers",
    holds=f"diffusers LoRA ({FILE}: unet.* / transformer.* / text_encoder*.* keys)",
    claims=claims,
    read=read,
    read_with_base=read_with_base,
    read_as_named=read_as_named,
    written_back=True,
    base_optional=True,
    writer=DiffusersWriter,
)
