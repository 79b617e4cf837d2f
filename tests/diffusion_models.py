"""Tiny Stable Diffusion pipelines, their LoRAs and diffusers' own merge of them: the oracles of the diffusion tests.

Everything is built from configs on the CPU (no downloads) and with diffusers' and PEFT's own code:

- ``tiny_pipeline``: a real diffusers pipeline folder (SD 1.5- or SDXL-shaped UNet, CLIP text encoder(s), VAE, DDIM
  scheduler; no tokenizer, no safety checker) written by ``save_pretrained``.
- ``diffusers_lora``: a LoRA trained by nobody (seeded random A and B) saved by the pipeline class's own
  ``save_lora_weights``, as diffusers' training scripts do.
- ``kohya_lora``: the same factors in kohya sd-scripts' keys, made with diffusers' ``convert_state_dict_to_kohya``.
- ``fused_reference``: ``load_lora_weights`` + ``fuse_lora`` on the pipeline, the weights diffusers itself merges.
- ``read_pipeline``: every tensor of a pipeline folder, to compare a merged folder with ``fused_reference``.

Quirks of diffusers 0.42.1 that these helpers work around (D = site-packages/diffusers):

- ``convert_state_dict_to_kohya`` (D/utils/state_dict_utils.py:504-509) names the first text encoder ``lora_te1``
  even for SD 1.x, where kohya's sd-scripts write ``lora_te`` (networks/lora.py); and it writes ``alpha`` =
  rank as an int64 (D/utils/state_dict_utils.py:516-518), dropping the PEFT ``lora_alpha``. ``kohya_lora`` renames
  and writes the true alpha as a float32 scalar, as sd-scripts does.
- ``load_lora_weights`` silently drops part of a UNet LoRA whose keys mix spellings: it converts the UNet's
  keys to PEFT's only when the FIRST key lacks "lora_A" (D/loaders/peft.py:238-241), and
  ``convert_state_dict_to_diffusers`` (what the SD 1.5/SDXL dreambooth scripts save) spells attention modules
  ``to_q.lora.down`` but every other module ``lora_A`` (D/utils/state_dict_utils.py:118-135, PEFT_TO_DIFFUSERS).
  With conv/ff/proj targets the first key is a ``lora_A`` one, the attention keys match no module and are
  dropped. diffusers logs nothing (its unexpected-key filter looks for ".lora_", D/utils/peft_utils.py:520); only
  PEFT warns (a RuntimeWarning) when the header's LoraConfig names the targets that got no weights. So
  ``diffusers_lora`` saves PEFT's own keys, which diffusers loads whole, and ``fused_reference`` checks that
  every module of the file got its LoRA layer.
- transformers 5.25's ``CLIPTextModel`` has no ``text_model.`` level in its names (state_dict and saved file:
  ``encoder.layers.0...``) while ``CLIPTextModelWithProjection`` (SDXL's text_encoder_2) keeps it
  (``text_model.encoder.layers.0...``). Converted as they are, SD 1.5 kohya keys would read
  ``lora_te1_encoder_layers_0_...``; real kohya files say ``lora_te_text_model_encoder_layers_0_...``, so
  ``kohya_lora`` puts ``text_model.`` back (diffusers strips it again on load, D/loaders/lora_base.py:387-388).
- ``load_lora_weights`` scales wrongly when a kohya file holds different alphas for different modules (the
  ``alpha_pattern`` keys it builds never match attention modules): every file here has one alpha.
- transformers 5.25's ``PreTrainedModel.add_adapter`` demands peft>=0.22, so text encoders get their LoRA from
  ``peft.inject_adapter_in_model`` (the result, and diffusers' loading, are the same).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

FAMILIES = ("sd15", "sdxl")

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY (D/loaders/lora_base.py)

# The modules the LoRA touches (PEFT matches a target as the module name's last dotted parts).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj")
UNET_CONV_TARGETS = ("conv1", "conv2", "conv_shortcut")  # resnets: 3x3, 3x3, 1x1 convs
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

for _name in ("diffusers", "transformers", "peft"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def _pipeline_class(family: str) -> type:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def text_encoders(family: str) -> tuple[str, ...]:
    """The pipeline's text encoder components: ``("text_encoder",)``, or with ``"text_encoder_2"`` for SDXL."""
    return ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)


def _tiny_unet(family: str) -> UNet2DConditionModel:
    sdxl = family == "sdxl"
    kw: dict = dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D") if sdxl else ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D") if sdxl else ("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64 if sdxl else 32,  # SDXL: both text encoders' hidden states, concatenated
        attention_head_dim=(2, 4) if sdxl else 8,
        norm_num_groups=32,
    )
    if sdxl:  # linear proj_in/proj_out, the micro-conditioning embedding, two transformer layers in the deep block
        kw.update(
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32,
            transformer_layers_per_block=(1, 2),
        )
    return UNet2DConditionModel(**kw)


def _tiny_clip(projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=32,
    )


def _no_zeros(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Default init leaves biases (and a few other tensors) at zero: give those small random values, so that
    every tensor of the pipeline is distinct and a mixed-up tensor shows."""
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.is_floating_point() and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))


def tiny_pipeline(root: Path, family: str) -> Path:
    """Build a tiny ``family`` pipeline (float32, seeded: the same bytes every call) and save it with
    ``save_pretrained(root / family, safe_serialization=True)``. Returns that folder, which holds
    model_index.json, scheduler/, unet/, vae/, text_encoder/ (and text_encoder_2/ for SDXL), each model as one
    .safetensors file. The tokenizers and (SD 1.5) the safety checker and feature extractor are None, so they
    are not saved: model_index.json lists them as ``[null, null]``."""
    cls = _pipeline_class(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(1)
        parts: dict = dict(unet=_tiny_unet(family), vae=_tiny_vae(), scheduler=DDIMScheduler())
        parts["text_encoder"] = _tiny_clip(projection=False)
        parts["tokenizer"] = None
        if family == "sdxl":
            parts.update(text_encoder_2=_tiny_clip(projection=True), tokenizer_2=None)
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        for value in parts.values():
            if isinstance(value, torch.nn.Module):
                _no_zeros(value, generator)
                value.to(torch.float32)
        pipe = cls(**parts)
    folder = Path(root) / family
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _load_text_encoder(folder: Path) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = json.loads((folder / "config.json").read_text())
    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in config["architectures"] else CLIPTextModel
    return cls.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)


def _randomize_lora(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every lora_A and lora_B (PEFT leaves B at zero by default) to 0.1·N(0, 1), in name order."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def _header(config: LoraConfig) -> dict:
    """The LoraConfig as save_lora_weights records it, its sets sorted (a set's order changes with the process's
    hash seed, and so would the file's bytes)."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()}


def diffusers_lora(
    pipeline: Path,
    out: Path,
    *,
    rank: int = 4,
    alpha: float = 4.0,
    text_encoder: bool = True,
    conv: bool = True,
    seed: int = 0,
) -> Path:
    """A LoRA (rank ``rank``, one ``lora_alpha`` = ``alpha`` everywhere) for the pipeline folder's UNet (attention,
    feed-forward, proj_in/out, time_emb_proj, and with ``conv`` the resnets' conv1/conv2/conv_shortcut) and, with
    ``text_encoder``, its text encoder(s) (q/k/v/out_proj, fc1, fc2). A and B are seeded random (0.1·N(0, 1)).

    Saved with ``<Pipeline>.save_lora_weights(out, unet_lora_layers=..., text_encoder_lora_layers=...,
    [text_encoder_2_lora_layers=...], <component>_lora_adapter_metadata=LoraConfig.to_dict())``, the layers being
    PEFT's ``get_peft_model_state_dict(m)`` (not ``convert_state_dict_to_diffusers`` of it, which diffusers then
    loads only in part: see the module's docstring). Returns ``out / "pytorch_lora_weights.safetensors"``. Its keys:
    ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` (and ``.lora_B.weight``),
    ``unet.down_blocks.0.resnets.0.conv1.lora_A.weight`` ([r, in, 3, 3]; lora_B [out, r, 1, 1]),
    ``text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight`` (transformers 5's names: no ``text_model.``);
    no alpha tensors. Its header's metadata is
    ``{"format": "pt", "lora_adapter_metadata": <JSON of {"unet.r": rank, "unet.lora_alpha": alpha,
    "unet.target_modules": [...], ..., "text_encoder.r": ..., ...}>}``: every LoraConfig field, prefixed with the
    component's name; diffusers reads r and lora_alpha back from it on load. The same tensors and metadata every
    call, but not always the same bytes: safetensors writes the header's two metadata entries in a random order."""
    family = _family_of(pipeline)
    cls = _pipeline_class(family)
    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet", local_files_only=True, torch_dtype=torch.float32)
    targets = list(UNET_TARGETS) + (list(UNET_CONV_TARGETS) if conv else [])
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets))
    _randomize_lora(unet, generator)
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
    metadata = {"unet_lora_adapter_metadata": _header(unet.peft_config["default"])}
    if text_encoder:
        for component in text_encoders(family):
            model = _load_text_encoder(pipeline / component)
            config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=list(TEXT_TARGETS))
            inject_adapter_in_model(config, model)
            _randomize_lora(model, generator)
            layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
            metadata[f"{component}_lora_adapter_metadata"] = _header(config)
    out = Path(out)
    cls.save_lora_weights(out, safe_serialization=True, **layers, **metadata)
    return out / LORA_FILE


def _family_of(pipeline: Path) -> str:
    index = json.loads((Path(pipeline) / "model_index.json").read_text())
    return "sdxl" if index["_class_name"] == "StableDiffusionXLPipeline" else "sd15"


def lora_metadata(lora_file: Path) -> dict:
    """The LoraConfig fields that ``save_lora_weights`` put in the file's header (``{"unet.lora_alpha": ...}``),
    or {} when there are none."""
    with safe_open(str(lora_file), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}


def kohya_lora(diffusers_file: Path, out_file: Path, family: str) -> Path:
    """The LoRA of ``diffusers_file`` (written by ``diffusers_lora``) in kohya sd-scripts' keys, the same factors
    bit for bit, saved as one .safetensors file; returns ``out_file``. Keys:
    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`` / ``.lora_up.weight``
    / ``.alpha`` (a float32 scalar, the file's lora_alpha), text encoders ``lora_te_text_model_encoder_layers_0_
    self_attn_q_proj.*`` for SD 1.5, ``lora_te1_...`` and ``lora_te2_...`` for SDXL. Conv factors keep their 4-D
    shapes (down [r, in, 3, 3], up [out, r, 1, 1]). The UNet keeps diffusers' module names (down_blocks_...), which
    is what sd-scripts writes for SD 1.x; sd-scripts' own SDXL files say input_blocks_... instead."""
    _pipeline_class(family)
    tensors = load_file(str(diffusers_file))
    meta = lora_metadata(diffusers_file)
    peft: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for component in ("unet", *text_encoders(family)):
        part = {k[len(component) + 1 :]: v for k, v in tensors.items() if k.startswith(component + ".")}
        if not part:
            continue
        if not all(".lora_A." in k or ".lora_B." in k for k in part):
            # a file of convert_state_dict_to_diffusers mixes spellings: the UNet's converter knows `to_q.lora.down`,
            # the other one the text encoders' `lora_linear_layer` (both pass `lora_A` through)
            part = convert_unet_state_dict_to_peft(part) if component == "unet" else convert_state_dict_to_peft(part)
        if component != "unet":  # kohya's text encoder names keep transformers 4's `text_model.` level
            part = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in part.items()}
        peft.update({f"{component}.{k}": v for k, v in part.items()})
        rank = next(v for k, v in part.items() if ".lora_A." in k).shape[0]
        alphas[component] = float(meta.get(f"{component}.lora_alpha", rank))  # no header: alpha = rank
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    kohya = {}
    for key, value in convert_state_dict_to_kohya(peft).items():
        if key.endswith(".alpha"):
            # diffusers wrote torch.tensor(rank), int64; sd-scripts keeps the network's alpha as a float scalar
            component = next(c for c, p in prefixes.items() if key.startswith(p))
            value = torch.tensor(alphas[component], dtype=torch.float32)
        if family == "sd15" and key.startswith("lora_te1_"):
            key = "lora_te_" + key[len("lora_te1_") :]  # diffusers says lora_te1_ for SD 1.x; sd-scripts lora_te_
        kohya[key] = value.contiguous()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(out_file))
    return out_file


def _load_pipeline(pipeline: Path, family: str) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    cls = _pipeline_class(family)
    absent: dict = {"tokenizer": None}
    if family == "sdxl":
        absent["tokenizer_2"] = None
    else:
        absent.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return cls.from_pretrained(pipeline, local_files_only=True, torch_dtype=torch.float32, **absent)


def _modules_in_file(lora_file: Path) -> int:
    """How many modules a LoRA file holds: one "down" (A) factor each, whatever the spelling."""
    downs = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")
    with safe_open(str(lora_file), framework="pt") as f:
        return sum(k.endswith(downs) for k in f.keys())


def fused_reference(pipeline: Path, lora_file: Path, family: str, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """diffusers' own merge: the pipeline folder loaded offline, ``load_lora_weights(lora_file)`` (a diffusers or a
    kohya file), ``fuse_lora(lora_scale=scale)``, ``unload_lora_weights()``. Returns every tensor of the UNet and
    the text encoder(s) as ``{"unet.<name>": float32 tensor, "text_encoder.<name>": ...}``, ``<name>`` as in the
    component's own state_dict() and its saved .safetensors file."""
    pipe = _load_pipeline(pipeline, family)
    pipe.load_lora_weights(str(lora_file))
    components = ("unet", *text_encoders(family))
    injected = {c: sum(isinstance(m, BaseTunerLayer) for m in getattr(pipe, c).modules()) for c in components}
    in_file = _modules_in_file(lora_file)
    if sum(injected.values()) != in_file:
        raise AssertionError(f"diffusers loaded {injected} LoRA modules of the {in_file} in {lora_file}")
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # the LoRA layers go, the fused base weights stay; names are the plain ones
    out = {}
    for component in components:
        model = getattr(pipe, component)
        out.update({f"{component}.{k}": v.detach().float().clone() for k, v in model.state_dict().items()})
    return out


def read_pipeline(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every component's .safetensors files in a pipeline folder (unet/, vae/, text_encoder/, ...),
    named ``<component>.<tensor name>``, as float32."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*/*.safetensors")):
        component = file.parent.name
        out.update({f"{component}.{k}": v.float() for k, v in load_file(str(file)).items()})
    return out
