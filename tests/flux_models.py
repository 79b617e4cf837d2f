"""A tiny Flux.1 transformer, its Black Forest Labs single-file twin, a kohya (sd-scripts) Flux LoRA for it and
diffusers' own merge of that LoRA: the fixtures and oracle of the Flux tests.

Everything is built from a config on the CPU (no downloads) and checked against diffusers' own code:

- ``tiny_flux``: a seeded ``FluxTransformer2DModel`` saved by ``save_pretrained`` (diffusers names, float32).
- ``bfl_single_file``: the same tensors in BFL's original layout (what ComfyUI and Forge load, optionally under
  ``model.diffusion_model.``), written as the exact inverse of diffusers' ``convert_flux_transformer_checkpoint_to_
  diffusers``; ``FluxTransformer2DModel.from_single_file`` gives back every tensor bit for bit.
- ``kohya_flux_lora``: a LoRA file with the keys sd-scripts' ``networks/lora_flux.py`` writes
  (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` ...), one for every module diffusers' kohya-Flux
  converter knows.
- ``fused_flux_reference``: ``FluxPipeline.load_lora_weights`` + ``fuse_lora`` (diffusers' merge, the oracle);
  ``fused_by_hand``: W + scale·alpha/r·up@down on the BFL tensors, cut back into diffusers' modules with
  ``BFL_SPLITS`` / ``BFL_RENAMES`` / ``BFL_SWAPS``. The two agree to float32 rounding.

Tables (module names; ``{i}`` is the block index, ``.format(i=...)`` them; a module's ``.weight`` and ``.bias``
follow it):

- ``BFL_SPLITS``: BFL modules that are row concatenations of diffusers modules, with each part's share of the rows
  in units of the model's width (inner_dim = heads·head_dim; the single blocks' MLP part is mlp_ratio = 4 units).
- ``BFL_RENAMES``: BFL modules that are one diffusers module, tensor for tensor.
- ``BFL_SWAPS``: ``final_layer.adaLN_modulation.1`` is diffusers' ``norm_out.linear`` with its two row halves
  swapped (BFL: shift then scale; diffusers: scale then shift), its LoRA's up factor likewise.
- ``BFL_NORMS``: the RMSNorm scales (tensor names; no LoRA touches them).

Quirks of diffusers 0.42.1 (D = site-packages/diffusers):

- Both Flux converters hard-code Flux.1-dev's width: ``inner_dim = 3072`` in the single-file converter
  (D/loaders/single_file_utils.py:2305, used by the ``torch.split`` of ``linear1`` at :2454-2456) and
  ``dims=[3072, 3072, 3072, 12288]`` for ``lora_unet_single_blocks_{i}_linear1`` in the kohya converter
  (D/loaders/lora_conversion_utils.py:552, checked by the ``assert sum(dims) == ...`` at :431). Neither loads a
  model of another width ("split_with_sizes expects split_sizes to sum exactly to 112"). ``diffusers_sized_for``
  recompiles those two functions from diffusers' own source with just that literal replaced by the model's width
  (everything else is diffusers' code, line for line) and puts them where diffusers looks them up for the duration
  of a ``with`` block.
- ``FluxPipeline.load_lora_weights`` SILENTLY DROPS every kohya module outside the blocks (img_in, txt_in,
  time_in, vector_in, guidance_in, final_layer): the kohya converter names them without the ``transformer.``
  prefix (``"x_embedder"``, ``"norm_out.linear.{lora_key}.weight"``, ... D/loaders/lora_conversion_utils.py:588-657,
  where the block modules get ``f"transformer.transformer_blocks.{i}..."``), and ``load_lora_adapter`` keeps only
  the keys under ``transformer.`` (D/loaders/peft.py:209-210). Nothing is logged. ``fused_flux_reference`` puts the
  prefix back on the converter's output (``lora_state_dict``) and hands that to ``load_lora_weights``;
  ``diffusers_attaches`` shows the plain path's loss.
- The kohya converter ignores the ``alpha`` of the ``final_layer`` modules (D/loaders/lora_conversion_utils.py:567
  "TODO: alphas.", :568-585 pops and drops them; :646-657), so diffusers applies those with alpha = rank whatever the
  file says. ``kohya_flux_lora`` writes alpha = rank for them (``final_layer_alpha``), the one value on which
  diffusers and a correct reader agree.
- The kohya converter's block loops stop at 19 double and 38 single blocks (:471, :541): Flux.1's counts.
- ``from_single_file`` does not check for missing keys (D/loaders/single_file_model.py:546-572, only unexpected
  ones are logged): a tensor the converter leaves out stays on the meta device. The tests compare every tensor.
- The single-file converter strips only the ``model.diffusion_model.`` prefix (D/loaders/single_file_utils.py:2298-
  2300); it finds the block counts as ``list(set(...))[-1] + 1`` (:2302-2303), which relies on CPython's set order
  of small ints.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

for _name in ("diffusers", "transformers", "peft"):
    logging.getLogger(_name).setLevel(logging.ERROR)

TINY_FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    pooled_projection_dim=6,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)
MLP_RATIO = 4  # FluxSingleTransformerBlock's mlp_ratio (fixed; D/loaders/single_file_utils.py:2304)
COMFY_PREFIX = "model.diffusion_model."
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what save_pretrained writes for a small model

# The kohya converter's tables, D/loaders/lora_conversion_utils.py:469-657 (_convert_sd_scripts_to_ai_toolkit):
# each `_convert_to_ai_toolkit_cat(sds, ait, f"lora_unet_<bfl module, . -> _>", [diffusers modules], dims=...)`.
BFL_SPLITS: dict[str, list[tuple[str, int]]] = {
    # :478-487, the three parts equal (dims=None: up rows // 3, :428-429)
    "double_blocks.{i}.img_attn.qkv": [
        ("transformer_blocks.{i}.attn.to_q", 1),
        ("transformer_blocks.{i}.attn.to_k", 1),
        ("transformer_blocks.{i}.attn.to_v", 1),
    ],
    # :512-521
    "double_blocks.{i}.txt_attn.qkv": [
        ("transformer_blocks.{i}.attn.add_q_proj", 1),
        ("transformer_blocks.{i}.attn.add_k_proj", 1),
        ("transformer_blocks.{i}.attn.add_v_proj", 1),
    ],
    # :542-553, dims=[3072, 3072, 3072, 12288] (:552; Flux.1's inner_dim three times, then mlp_ratio·inner_dim)
    "single_blocks.{i}.linear1": [
        ("single_transformer_blocks.{i}.attn.to_q", 1),
        ("single_transformer_blocks.{i}.attn.to_k", 1),
        ("single_transformer_blocks.{i}.attn.to_v", 1),
        ("single_transformer_blocks.{i}.proj_mlp", MLP_RATIO),
    ],
}
# `_convert_to_ai_toolkit(sds, ait, f"lora_unet_<bfl module>", diffusers module)`: one module for one module.
BFL_RENAMES: dict[str, str] = {
    "double_blocks.{i}.img_attn.proj": "transformer_blocks.{i}.attn.to_out.0",  # :472-477
    "double_blocks.{i}.img_mlp.0": "transformer_blocks.{i}.ff.net.0.proj",  # :488-493
    "double_blocks.{i}.img_mlp.2": "transformer_blocks.{i}.ff.net.2",  # :494-499
    "double_blocks.{i}.img_mod.lin": "transformer_blocks.{i}.norm1.linear",  # :500-505
    "double_blocks.{i}.txt_attn.proj": "transformer_blocks.{i}.attn.to_add_out",  # :506-511
    "double_blocks.{i}.txt_mlp.0": "transformer_blocks.{i}.ff_context.net.0.proj",  # :522-527
    "double_blocks.{i}.txt_mlp.2": "transformer_blocks.{i}.ff_context.net.2",  # :528-533
    "double_blocks.{i}.txt_mod.lin": "transformer_blocks.{i}.norm1_context.linear",  # :534-539
    "single_blocks.{i}.linear2": "single_transformer_blocks.{i}.proj_out",  # :554-559
    "single_blocks.{i}.modulation.lin": "single_transformer_blocks.{i}.norm.linear",  # :560-565
    # the rest are not in a block; the converter names them without the "transformer." prefix (see the docstring)
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",  # :588-593
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",  # :595-600
    "img_in": "x_embedder",  # :603-608
    "txt_in": "context_embedder",  # :611-616
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",  # :619-624
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",  # :625-630
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",  # :633-638
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",  # :639-644
    "final_layer.linear": "proj_out",  # :655 (assign_remaining_weights, no transform; alpha dropped, :581-585)
}
# :648-657: lora_B of final_layer.adaLN_modulation.1 goes through swap_scale_shift (lora_conversion_utils.py:25-28)
BFL_SWAPS: dict[str, str] = {"final_layer.adaLN_modulation.1": "norm_out.linear"}
# The RMSNorm scales, tensor names (D/loaders/single_file_utils.py:2397-2409 and :2468-2474).
BFL_NORMS: dict[str, str] = {
    "double_blocks.{i}.img_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_q.weight",
    "double_blocks.{i}.img_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_k.weight",
    "double_blocks.{i}.txt_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_added_q.weight",
    "double_blocks.{i}.txt_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_added_k.weight",
    "single_blocks.{i}.norm.query_norm.scale": "single_transformer_blocks.{i}.attn.norm_q.weight",
    "single_blocks.{i}.norm.key_norm.scale": "single_transformer_blocks.{i}.attn.norm_k.weight",
}


def _config(transformer_dir: Path) -> dict:
    return json.loads((Path(transformer_dir) / "config.json").read_text())


def _width(transformer_dir: Path) -> int:
    config = _config(transformer_dir)
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


def _expand(template: str, transformer_dir: Path) -> list[str]:
    """A table name for every block it applies to (no ``{i}``: itself)."""
    config = _config(transformer_dir)
    if template.startswith("double_blocks."):
        return [template.format(i=i) for i in range(config["num_layers"])]
    if template.startswith("single_blocks."):
        return [template.format(i=i) for i in range(config["num_single_layers"])]
    if "{i}" in template:
        raise ValueError(template)
    return [template]


def bfl_modules(transformer_dir: Path) -> dict[str, list[tuple[str, int]]]:
    """Every BFL linear module of the model -> its diffusers parts ``[(module, share), ...]`` (one part of share 1
    for a rename or a swap), in the order of BFL_SPLITS, BFL_RENAMES, BFL_SWAPS; ``guidance_in`` only when the
    model has guidance embeddings."""
    guidance = bool(_config(transformer_dir).get("guidance_embeds"))
    out: dict[str, list[tuple[str, int]]] = {}
    for template, parts in BFL_SPLITS.items():
        for i, name in enumerate(_expand(template, transformer_dir)):
            out[name] = [(p.format(i=i), share) for p, share in parts]
    for table in (BFL_RENAMES, BFL_SWAPS):
        for template, target in table.items():
            if template.startswith("guidance_in.") and not guidance:
                continue
            for i, name in enumerate(_expand(template, transformer_dir)):
                out[name] = [(target.format(i=i), 1)]
    return out


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' swap_scale_shift (D/loaders/single_file_utils.py:2309-2312): its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter to 0.1·N(0, 1) (no zero biases, norm scales that are not all ones), in name order."""
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def tiny_flux(root: Path) -> Path:
    """Build the tiny ``FluxTransformer2DModel`` of TINY_FLUX_CONFIG (width 16: 2 heads of 8; 2 double and 2 single
    blocks; guidance embeddings), every parameter seeded random (0.1·N(0, 1), float32; the same bytes every call),
    and save it with ``save_pretrained(root / "transformer")``. Returns that folder (config.json and
    diffusion_pytorch_model.safetensors, diffusers names)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**TINY_FLUX_CONFIG).to(torch.float32)
    _randomize(model, torch.Generator().manual_seed(1))
    folder = Path(root) / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def read_transformer(transformer_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the transformer folder's .safetensors file(s), diffusers names."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(transformer_dir).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def to_bfl(diffusers_sd: dict[str, torch.Tensor], transformer_dir: Path) -> dict[str, torch.Tensor]:
    """The diffusers state dict in BFL names: the inverse of convert_flux_transformer_checkpoint_to_diffusers
    (D/loaders/single_file_utils.py:2294-2488), tensor for tensor. Raises if a diffusers tensor is left over."""
    left = dict(diffusers_sd)
    out: dict[str, torch.Tensor] = {}
    for bfl, parts in bfl_modules(transformer_dir).items():
        for suffix in ("weight", "bias"):
            # :2375-2396 (double qkv: torch.chunk in 3), :2456-2467 (linear1: torch.split by (3072,)*3 + (12288,))
            pieces = [left.pop(f"{name}.{suffix}") for name, _ in parts]
            tensor = torch.cat(pieces, dim=0)
            if bfl in BFL_SWAPS:
                tensor = _swap_halves(tensor)  # :2481-2486
            out[f"{bfl}.{suffix}"] = tensor.contiguous()
    for template, target in BFL_NORMS.items():
        for i, name in enumerate(_expand(template, transformer_dir)):
            out[name] = left.pop(target.format(i=i))
    if left:
        raise AssertionError(f"no BFL name for {sorted(left)}")
    return out


def bfl_single_file(transformer_dir: Path, out: Path, prefix: str = "") -> Path:
    """The transformer folder's tensors in Black Forest Labs' original layout, every key behind ``prefix`` (``""``
    as BFL releases it, ``"model.diffusion_model."`` as ComfyUI saves it), as one .safetensors file; returns
    ``out``. ``double_blocks.0.img_attn.qkv.weight`` = cat(to_q, to_k, to_v), ``single_blocks.0.linear1.weight`` =
    cat(to_q, to_k, to_v, proj_mlp), ``final_layer.adaLN_modulation.1.*`` with its row halves swapped,
    ``*.norm.query_norm.scale``, ``img_in``, ``txt_in``, ``time_in.in_layer``, ... float32 as in the folder."""
    bfl = to_bfl(read_transformer(transformer_dir), transformer_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v for k, v in bfl.items()}, str(out))
    return out


def kohya_name(bfl_module: str) -> str:
    """sd-scripts' LoRA name of a BFL module (networks/lora_flux.py: ``lora_unet`` + "_" + name with "." -> "_")."""
    return "lora_unet_" + bfl_module.replace(".", "_")


def kohya_flux_lora(
    transformer_dir: Path,
    out: Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    final_layer_alpha: float | None = None,
    blocks_only: bool = False,
) -> Path:
    """A kohya sd-scripts Flux LoRA for the tiny transformer: for every module of ``bfl_modules`` (double blocks'
    img/txt attn qkv and proj, mlp 0/2, mod lin; single blocks' linear1, linear2, modulation lin; img_in, txt_in,
    time_in/vector_in/guidance_in in_layer/out_layer; final_layer linear and adaLN_modulation_1), the keys
    ``lora_unet_<module, "." -> "_">.lora_down.weight`` [rank, in], ``.lora_up.weight`` [out, rank] (the BFL
    module's rows: 3·width for a qkv, 3·width + 4·width for linear1) and ``.alpha`` (a float32 scalar). Down and up
    are seeded random 0.1·N(0, 1). ``alpha`` everywhere but the final_layer modules, which get ``final_layer_alpha``
    (default: rank, since diffusers ignores their alpha; see the module's docstring). With ``blocks_only`` just the
    double and single blocks' modules, what sd-scripts writes by default (no ``--network_args in_dims``). Returns
    ``out``."""
    generator = torch.Generator().manual_seed(seed)
    bfl = to_bfl(read_transformer(transformer_dir), transformer_dir)
    tensors: dict[str, torch.Tensor] = {}
    for module in bfl_modules(transformer_dir):
        if blocks_only and not module.startswith(("double_blocks.", "single_blocks.")):
            continue
        rows, cols = bfl[module + ".weight"].shape
        name = kohya_name(module)
        value = alpha
        if module.startswith("final_layer."):
            value = float(rank) if final_layer_alpha is None else final_layer_alpha
        tensors[f"{name}.lora_down.weight"] = 0.1 * torch.randn(rank, cols, generator=generator)
        tensors[f"{name}.lora_up.weight"] = 0.1 * torch.randn(rows, rank, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(float(value), dtype=torch.float32)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def _recompiled(module: object, name: str, old: str, new: str):
    """``module.name`` compiled again from diffusers' own source with ``old`` (which must occur exactly once)
    replaced by ``new``, its globals a copy of the module's, its line numbers those of the file."""
    fn = getattr(module, name)
    source = inspect.getsource(fn)
    if source.count(old) != 1:
        raise RuntimeError(f"{name}: expected {old!r} once in diffusers' source; diffusers changed, check the patch")
    first_line = inspect.getsourcelines(fn)[1]
    code = compile("\n" * (first_line - 1) + source.replace(old, new), inspect.getsourcefile(fn) or name, "exec")
    namespace = dict(vars(module))
    exec(code, namespace)  # noqa: S102  (diffusers' own code, one literal changed)
    return namespace[name]


@contextlib.contextmanager
def diffusers_sized_for(transformer_dir: Path) -> Iterator[None]:
    """Within the block, diffusers' two Flux converters take the width of ``transformer_dir``'s model instead of
    Flux.1's 3072: ``convert_flux_transformer_checkpoint_to_diffusers`` (``inner_dim = 3072``,
    D/loaders/single_file_utils.py:2305) where ``from_single_file`` finds it (SINGLE_FILE_LOADABLE_CLASSES,
    D/loaders/single_file_model.py:119-122, read at :429), and ``_convert_kohya_flux_lora_to_diffusers``
    (``dims=[3072, 3072, 3072, 12288]``, D/loaders/lora_conversion_utils.py:548) where
    ``FluxLoraLoaderMixin.lora_state_dict`` calls it (a global of D/loaders/lora_pipeline.py)."""
    from diffusers.loaders import lora_conversion_utils, lora_pipeline, single_file_model, single_file_utils

    width = _width(transformer_dir)
    single_file = _recompiled(
        single_file_utils,
        "convert_flux_transformer_checkpoint_to_diffusers",
        "inner_dim = 3072",
        f"inner_dim = {width}",
    )
    kohya = _recompiled(
        lora_conversion_utils,
        "_convert_kohya_flux_lora_to_diffusers",
        "dims=[3072, 3072, 3072, 12288]",
        f"dims=[{width}, {width}, {width}, {MLP_RATIO * width}]",
    )
    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    saved = entry["checkpoint_mapping_fn"], lora_pipeline._convert_kohya_flux_lora_to_diffusers
    entry["checkpoint_mapping_fn"] = single_file
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = kohya
    try:
        yield
    finally:
        entry["checkpoint_mapping_fn"], lora_pipeline._convert_kohya_flux_lora_to_diffusers = saved


def lora_modules_in_file(lora_file: Path) -> list[str]:
    """The kohya module names of a LoRA file (one per ``.lora_down.weight``), sorted."""
    with safe_open(str(lora_file), framework="pt") as f:
        return sorted(k[: -len(".lora_down.weight")] for k in f.keys() if k.endswith(".lora_down.weight"))


def expected_lora_targets(transformer_dir: Path, lora_file: Path) -> set[str]:
    """The diffusers modules that the file's LoRA modules become (a qkv three, a linear1 four)."""
    by_kohya = {kohya_name(m): parts for m, parts in bfl_modules(transformer_dir).items()}
    return {name for module in lora_modules_in_file(lora_file) for name, _ in by_kohya[module]}


def load_flux_pipeline(transformer_dir: Path) -> FluxPipeline:
    """A FluxPipeline of the folder's transformer and nothing else (text encoders, tokenizers, VAE, scheduler None)."""
    transformer = FluxTransformer2DModel.from_pretrained(
        transformer_dir, local_files_only=True, torch_dtype=torch.float32
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )


def lora_layers(model: torch.nn.Module) -> set[str]:
    """The names of the modules that hold a PEFT LoRA layer."""
    return {name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def diffusers_attaches(transformer_dir: Path, lora_file: Path) -> set[str]:
    """The modules to which plain ``FluxPipeline.load_lora_weights(lora_file)`` attaches a LoRA layer (within
    ``diffusers_sized_for``): for a kohya file, only the blocks' modules (see the module's docstring)."""
    with diffusers_sized_for(transformer_dir):
        pipe = load_flux_pipeline(transformer_dir)
        pipe.load_lora_weights(str(lora_file))
    return lora_layers(pipe.transformer)


def diffusers_lora_state_dict(transformer_dir: Path, lora_file: Path) -> dict[str, torch.Tensor]:
    """``FluxPipeline.lora_state_dict(lora_file)`` (within ``diffusers_sized_for``; a kohya file goes through
    ``_convert_kohya_flux_lora_to_diffusers``, alpha/r baked into lora_A/lora_B), with ``transformer.`` put back
    before the keys the converter left without a component (D/loaders/lora_conversion_utils.py:588-657)."""
    with diffusers_sized_for(transformer_dir):
        state_dict = FluxPipeline.lora_state_dict(str(lora_file))
    return {
        k if k.startswith(("transformer.", "text_encoder.")) else "transformer." + k: v for k, v in state_dict.items()
    }


def fused_flux_reference(transformer_dir: Path, lora_file: Path, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """diffusers' own merge: ``FluxPipeline(transformer=<folder's model>, everything else None)``,
    ``load_lora_weights(diffusers_lora_state_dict(...))`` (diffusers' kohya conversion, its one dropping bug
    repaired; ``load_lora_into_transformer`` -> ``transformer.load_lora_adapter``), a check that every module of the
    file got its PEFT LoRA layer (a qkv three, a linear1 four: exactly ``expected_lora_targets``),
    ``fuse_lora(components=["transformer"], lora_scale=scale)`` and ``unload_lora_weights()``. Returns the
    transformer's state dict (diffusers names, float32 copies)."""
    state_dict = diffusers_lora_state_dict(transformer_dir, lora_file)
    pipe = load_flux_pipeline(transformer_dir)
    pipe.load_lora_weights(state_dict)  # already diffusers keys: lora_state_dict passes them through
    got = lora_layers(pipe.transformer)
    want = expected_lora_targets(transformer_dir, lora_file)
    if got != want:
        raise AssertionError(f"diffusers attached LoRA layers to {sorted(got ^ want)} against the file's modules")
    pipe.fuse_lora(components=["transformer"], lora_scale=scale)
    pipe.unload_lora_weights()
    return {k: v.detach().float().clone() for k, v in pipe.transformer.state_dict().items()}


def fused_by_hand(transformer_dir: Path, lora_file: Path, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The kohya merge on the BFL tensors, by hand: for each module of the file, ΔW = scale·alpha/r·up@down (in
    float64) on the BFL weight, cut back into the diffusers modules with BFL_SPLITS (rows by share of the width),
    BFL_RENAMES and BFL_SWAPS (row halves swapped). Every other tensor is the folder's, untouched. Returns the
    state dict in diffusers names, float32."""
    base = read_transformer(transformer_dir)
    width = _width(transformer_dir)
    lora = load_file(str(lora_file))
    by_kohya = {kohya_name(m): (m, parts) for m, parts in bfl_modules(transformer_dir).items()}
    out = {k: v.clone() for k, v in base.items()}
    for name in lora_modules_in_file(lora_file):
        module, parts = by_kohya[name]
        down = lora[f"{name}.lora_down.weight"].double()
        up = lora[f"{name}.lora_up.weight"].double()
        alpha = float(lora[f"{name}.alpha"]) if f"{name}.alpha" in lora else float(down.shape[0])
        delta = scale * alpha / down.shape[0] * (up @ down)
        if module in BFL_SWAPS:
            delta = _swap_halves(delta)
        rows = [share * width for _, share in parts] if len(parts) > 1 else [delta.shape[0]]
        for (target, _), piece in zip(parts, torch.split(delta, rows, dim=0), strict=True):
            key = f"{target}.weight"
            out[key] = (base[key].double() + piece).float()
    return out
