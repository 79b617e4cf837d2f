"""Flux.1's two namings: Black Forest Labs' original layout (the single files ComfyUI and Forge load, and what
kohya's Flux LoRAs name: ``double_blocks.N.img_attn.qkv``) and diffusers' (``transformer_blocks.N.attn.to_q``).
The original fuses modules diffusers keeps apart -- a double block's q, k and v in one ``qkv``, a single
block's q, k, v and MLP input in one ``linear1`` -- so one original module is one or more diffusers modules,
each a block of its rows.

The table is diffusers' own ``convert_flux_transformer_checkpoint_to_diffusers``
(``loaders/single_file_utils.py``): the same renames, and the same splits (``torch.chunk(qkv, 3)``;
``linear1`` split (inner, inner, inner, mlp_ratio · inner) with mlp_ratio 4). Rows are given in units of
the fused tensor: a part ``(start, stop, of)`` is rows [rows·start/of, rows·stop/of).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .builtin import layers
from .model import ModelNames

PREFIXES = ("model.diffusion_model.", "")  # ComfyUI's saved checkpoints, BFL's own files
MARKER = "double_blocks.0.img_attn.qkv.weight"  # a key every Flux.1 original-layout file holds
# original module within a double block -> its diffusers parts: (module in the block, start, stop, of)
DOUBLE: dict[str, tuple[tuple[str, int, int, int], ...]] = {
    "img_attn.qkv": (("attn.to_q", 0, 1, 3), ("attn.to_k", 1, 2, 3), ("attn.to_v", 2, 3, 3)),
    "txt_attn.qkv": (("attn.add_q_proj", 0, 1, 3), ("attn.add_k_proj", 1, 2, 3), ("attn.add_v_proj", 2, 3, 3)),
    "img_attn.proj": (("attn.to_out.0", 0, 1, 1),),
    "txt_attn.proj": (("attn.to_add_out", 0, 1, 1),),
    "img_mlp.0": (("ff.net.0.proj", 0, 1, 1),),
    "img_mlp.2": (("ff.net.2", 0, 1, 1),),
    "txt_mlp.0": (("ff_context.net.0.proj", 0, 1, 1),),
    "txt_mlp.2": (("ff_context.net.2", 0, 1, 1),),
    "img_mod.lin": (("norm1.linear", 0, 1, 1),),
    "txt_mod.lin": (("norm1_context.linear", 0, 1, 1),),
}
SINGLE: dict[str, tuple[tuple[str, int, int, int], ...]] = {
    "linear1": (("attn.to_q", 0, 1, 7), ("attn.to_k", 1, 2, 7), ("attn.to_v", 2, 3, 7), ("proj_mlp", 3, 7, 7)),
    "linear2": (("proj_out", 0, 1, 1),),
    "modulation.lin": (("norm.linear", 0, 1, 1),),
}
# whole modules outside the blocks (final_layer.adaLN_modulation is not one: diffusers swaps its halves)
GLOBAL: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
# the first part of every original-layout module name (the blocks, the embedders, the final layer)
TOP = frozenset({"double_blocks", "single_blocks", *(m.partition(".")[0] for m in GLOBAL)})
NORMS = {  # the q/k norms' scale -> diffusers' weight
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def diffusers_parts(module: str) -> tuple[tuple[str, int, int, int], ...] | None:
    """The diffusers modules an original-layout module is, each with its block of rows (None: not one)."""
    if module in GLOBAL:
        return ((GLOBAL[module], 0, 1, 1),)
    found = _BLOCK.match(module)
    if found is None:
        return None
    table = DOUBLE if found[1] == "double_blocks" else SINGLE
    parts = table.get(found[3])
    prefix = f"{_DIFFUSERS_BLOCK[found[1]]}.{found[2]}."
    return None if parts is None else tuple((prefix + name, start, stop, of) for name, start, stop, of in parts)


def flux_names(file_keys: Sequence[str]) -> ModelNames | None:
    """A Flux.1 original-layout checkpoint's names: diffusers' under ``transformer.`` in memory, a fused file
    tensor's parts as row blocks (None: the keys are not one)."""
    prefix = next((p for p in PREFIXES if p + MARKER in file_keys), None)
    if prefix is None:
        return None
    file_of: dict[str, str] = {}
    blocks: dict[str, tuple[str, int, int, int]] = {}
    for key in file_keys:
        name = key.removeprefix(prefix)
        module, _, leaf = name.rpartition(".")
        parts = diffusers_parts(module) if leaf in ("weight", "bias") else None
        norm = _norm(name)
        if norm is not None:
            file_of[f"transformer.{norm}"] = key
        elif parts is None:
            file_of[key] = key  # not a module diffusers renames (final_layer.adaLN_modulation): its own name
        elif len(parts) == 1:
            file_of[f"transformer.{parts[0][0]}.{leaf}"] = key
        else:
            blocks.update((f"transformer.{part}.{leaf}", (key, start, stop, of)) for part, start, stop, of in parts)
    return ModelNames(
        file_of,
        {},
        None,
        None,
        source="single-file Flux.1 (Black Forest Labs' original names read as diffusers')",
        layers=layers([*file_of, *blocks], None),
        row_blocks=blocks,
    )


def _norm(name: str) -> str | None:
    found = _BLOCK.match(name)
    if found is None or found[3] not in NORMS:
        return None
    return f"{_DIFFUSERS_BLOCK[found[1]]}.{found[2]}.{NORMS[found[3]]}"
