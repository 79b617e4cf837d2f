"""Tensor names of a Stable Diffusion UNet: diffusers' ``UNet2DConditionModel`` against the single-file
"original" layout (CompVis LDM for SD 1.x/2.x, Stability's SGM for SDXL), both directions.

The single file keeps the UNet under ``model.diffusion_model.``:

* ``input_blocks.0.0`` is ``conv_in``; then each level ``b`` holds ``L`` (layers_per_block) entries of a
  resnet (``.0``) and, on attention levels, a transformer (``.1``), followed, except on the last level, by
  one entry holding the downsampler's conv (``input_blocks.N.0.op``). Entry ``i >= 1`` is level
  ``(i - 1) // (L + 1)``, layer ``(i - 1) % (L + 1)``.
* ``middle_block.0/1/2``: resnet, transformer, resnet.
* ``output_blocks.i`` is up level ``i // (L + 1)``, layer ``i % (L + 1)`` (``L + 1`` resnets a level):
  a resnet (``.0``), a transformer (``.1``) where the level has one, and on the level's last layer
  (except the last level) the upsampler's conv at ``.1.conv``, or ``.2.conv`` behind a transformer.
* ``time_embed.0/2``, ``label_emb.0.0/0.2`` (SDXL's text-time embedding), ``label_emb.weight`` (a class
  embedding table), ``out.0`` (the norm) and ``out.2`` (the conv).
* A resnet's ``in_layers.0/2``, ``emb_layers.1``, ``out_layers.0/3``, ``skip_connection`` are diffusers'
  ``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``, ``conv_shortcut``; a transformer's
  names (``norm``, ``proj_in``, ``proj_out``, ``transformer_blocks.K.*``) are the same in both.

The facts are diffusers' own: ``convert_ldm_unet_checkpoint`` and ``update_unet_resnet_ldm_to_diffusers``
with the ``DIFFUSERS_TO_LDM_MAPPING["unet"]`` table in ``diffusers/loaders/single_file_utils.py``, which
``tests/test_ldm_unet_names.py`` uses as the oracle. Nothing in a single file says what the layout is:
the structure (levels, layers_per_block, attention levels) is read off the names themselves. Only the
standard library is used, so that the package imports fast.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["ldm_unet_keys", "ldm_unet_map"]

# diffusers name -> LDM name (both without the prefix), the tensors outside any block
_FIXED = {
    f"{d}.{p}": f"{o}.{p}"
    for d, o in (
        ("conv_in", "input_blocks.0.0"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    )
    for p in ("weight", "bias")
} | {"class_embedding.weight": "label_emb.weight"}
_FIXED_BACK = {o: d for d, o in _FIXED.items()}

# resnet sub-module names: LDM -> diffusers
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_BACK = {d: o for o, d in _RESNET.items()}
_PARAM = r"\.(?:weight|bias)"
_ATTENTION = re.compile(
    r"(?:norm|proj_in|proj_out|transformer_blocks\.\d+\.(?:"
    r"attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|norm[123]|ff\.net\.0\.proj|ff\.net\.2))" + _PARAM
)
_LDM_KEY = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)")
_LDM_MID_KEY = re.compile(r"middle_block\.(\d+)\.(.+)")
_DIFFUSERS_KEY = re.compile(
    r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_MID_KEY = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_CORE = ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight")


def _resnet(rest: str) -> str | None:
    """A resnet's inner LDM name in diffusers' words, None when it is not one."""
    m = re.fullmatch(r"(.+)(" + _PARAM + ")", rest)
    if m is None or m.group(1) not in _RESNET:
        return None
    return _RESNET[m.group(1)] + m.group(2)


def _resnet_back(rest: str) -> str | None:
    """A resnet's inner diffusers name in LDM's words, None when it is not one."""
    m = re.fullmatch(r"(.+)(" + _PARAM + ")", rest)
    if m is None or m.group(1) not in _RESNET_BACK:
        return None
    return _RESNET_BACK[m.group(1)] + m.group(2)


def _attention(rest: str) -> str | None:
    """A transformer's inner name (the same in both layouts), None when it is not one."""
    return rest if _ATTENTION.fullmatch(rest) else None


def _sampler(rest: str, conv: str) -> str | None:
    """A down/upsampler's parameter: ``{conv}.weight`` in LDM is ``conv.weight`` in diffusers."""
    m = re.fullmatch(re.escape(conv) + "(" + _PARAM + ")", rest)
    return None if m is None else "conv" + m.group(1)


def _input_block(i: int, k: int, rest: str, per: int) -> str | None:
    """``input_blocks.i.k.rest`` (i >= 1) in diffusers' words; ``per`` is layers_per_block + 1."""
    b, j = divmod(i - 1, per)
    if j == per - 1:
        new = _sampler(rest, "op") if k == 0 else None
        return None if new is None else f"down_blocks.{b}.downsamplers.0.{new}"
    new, kind = (_resnet(rest), "resnets") if k == 0 else (_attention(rest) if k == 1 else None, "attentions")
    return None if new is None else f"down_blocks.{b}.{kind}.{j}.{new}"


def _output_block(i: int, k: int, rest: str, per: int) -> str | None:
    """``output_blocks.i.k.rest`` in diffusers' words; ``per`` is layers_per_block + 1."""
    b, j = divmod(i, per)
    if k == 0:
        new = _resnet(rest)
        return None if new is None else f"up_blocks.{b}.resnets.{j}.{new}"
    if k in (1, 2) and rest.startswith("conv."):
        new = _sampler(rest, "conv") if j == per - 1 else None
        return None if new is None else f"up_blocks.{b}.upsamplers.0.{new}"
    new = _attention(rest) if k == 1 else None
    return None if new is None else f"up_blocks.{b}.attentions.{j}.{new}"


def _middle_block(k: int, rest: str) -> str | None:
    """``middle_block.k.rest`` in diffusers' words: resnet, transformer, resnet."""
    if k == 1:
        new = _attention(rest)
        return None if new is None else f"mid_block.attentions.0.{new}"
    new = _resnet(rest) if k in (0, 2) else None
    return None if new is None else f"mid_block.resnets.{k // 2}.{new}"


def _to_diffusers(key: str, per: int) -> str | None:
    """One LDM name (prefix removed) in diffusers' words, None when it is not a UNet's."""
    if key in _FIXED_BACK:
        return _FIXED_BACK[key]
    m = _LDM_MID_KEY.fullmatch(key)
    if m is not None:
        return _middle_block(int(m.group(1)), m.group(2))
    m = _LDM_KEY.fullmatch(key)
    if m is None:
        return None
    where, i, k, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if where == "input_blocks":
        return _input_block(i, k, rest, per) if i >= 1 else None
    return _output_block(i, k, rest, per)


def _ldm_layout(keys: list[str]) -> int | None:
    """layers_per_block + 1, read off the names: the first downsampler sits at ``input_blocks.L+1``, a
    model of one level has none; None when the entries do not add up to a UNet (the same number of input
    and output entries, a downsampler closing and an upsampler opening every level but the lowest)."""
    inputs: set[int] = set()
    outputs: set[int] = set()
    ops: set[int] = set()
    ups: set[int] = set()
    for key in keys:
        m = _LDM_KEY.fullmatch(key)
        if m is not None:
            down = m.group(1) == "input_blocks"
            (inputs if down else outputs).add(int(m.group(2)))
            if m.group(4).startswith("op." if down else "conv."):
                (ops if down else ups).add(int(m.group(2)))
    if not inputs or inputs != outputs or inputs != set(range(len(inputs))):
        return None
    per = min(ops) if ops else len(inputs)
    levels, extra = divmod(len(inputs), per)
    if per < 2 or extra or ops != {per * b for b in range(1, levels)} or ups != {per * b - 1 for b in range(1, levels)}:
        return None
    return per


def ldm_unet_map(file_keys: Iterable[str], prefix: str = "model.diffusion_model.") -> dict[str, str] | None:
    """{diffusers UNet name: the file's key} for every key of a single-file checkpoint under ``prefix``;
    None when those keys are not an LDM/SGM UNet's (none there, one unknown, the blocks do not add up)."""
    keys = [k[len(prefix) :] for k in file_keys if k.startswith(prefix)]
    per = _ldm_layout(keys)
    if per is None or not all(k in keys for k in _CORE):
        return None
    out: dict[str, str] = {}
    for key in keys:
        new = _to_diffusers(key, per)
        if new is None or new in out:
            return None
        out[new] = prefix + key
    return out


def _down_block(b: int, kind: str, j: int, rest: str, per: int) -> str | None:
    """``down_blocks.b.kind.j.rest`` in LDM's words; ``per`` is layers_per_block + 1."""
    if kind == "downsamplers":
        new = _sampler(rest, "conv") if j == 0 else None
        return None if new is None else f"input_blocks.{per * (b + 1)}.0.op{new.removeprefix('conv')}"
    if j >= per - 1:
        return None
    new, k = (_resnet_back(rest), 0) if kind == "resnets" else (_attention(rest), 1)
    return None if new is None else f"input_blocks.{1 + b * per + j}.{k}.{new}"


def _up_block(b: int, kind: str, j: int, rest: str, per: int, attended: set[int]) -> str | None:
    """``up_blocks.b.kind.j.rest`` in LDM's words; ``attended``: the up levels with transformers."""
    if kind == "upsamplers":
        new = _sampler(rest, "conv") if j == 0 else None
        k = 2 if b in attended else 1
        return None if new is None else f"output_blocks.{b * per + per - 1}.{k}.{new}"
    if j >= per:
        return None
    new, k = (_resnet_back(rest), 0) if kind == "resnets" else (_attention(rest), 1)
    return None if new is None else f"output_blocks.{b * per + j}.{k}.{new}"


def _to_ldm(key: str, per: int, attended: set[int]) -> str | None:
    """One diffusers name in LDM's words (no prefix), None when it is not a UNet's."""
    if key in _FIXED:
        return _FIXED[key]
    m = _MID_KEY.fullmatch(key)
    if m is not None:
        i, rest = int(m.group(2)), m.group(3)
        if m.group(1) == "attentions":
            return None if i or _attention(rest) is None else f"middle_block.1.{rest}"
        new = _resnet_back(rest) if i in (0, 1) else None
        return None if new is None else f"middle_block.{2 * i}.{new}"
    m = _DIFFUSERS_KEY.fullmatch(key)
    if m is None:
        return None
    where, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if where == "down_blocks":
        return None if kind == "upsamplers" else _down_block(b, kind, j, rest, per)
    return None if kind == "downsamplers" else _up_block(b, kind, j, rest, per, attended)


def ldm_unet_keys(diffusers_keys: Iterable[str], prefix: str = "model.diffusion_model.") -> dict[str, str] | None:
    """{diffusers UNet name: the single file's key} for writing a diffusers UNet as one LDM/SGM file, the
    structure read off the diffusers names; None when they are not a ``UNet2DConditionModel``'s (or the
    file's names would not read back to the same ones)."""
    keys = list(diffusers_keys)
    layers = {int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    if not layers:
        return None
    per = max(layers) + 2
    attended = {int(m.group(1)) for k in keys if (m := re.match(rf"up_blocks\.(\d+)\.attentions\.{per - 1}\.", k))}
    out: dict[str, str] = {}
    for key in keys:
        new = _to_ldm(key, per, attended)
        if new is None:
            return None
        out[key] = prefix + new
    return out if ldm_unet_map(out.values(), prefix) == out else None
