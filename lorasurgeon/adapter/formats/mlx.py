"""MLX-LM's LoRA and DoRA adapters (docs/formats.md, "MLX-LM adapters"): adapter_config.json beside
adapters.safetensors, as ``mlx_lm.lora`` writes them and ``mlx_lm.tuner.utils.load_adapters`` reads them.

- Names: the model's parameter names as mlx-lm's model classes name them (``model.layers.0.self_attn.q_proj``,
  for Llama-style models the same as transformers'), taken to be the base model's in-memory names, plus a leaf:
  ``.lora_a``, ``.lora_b``, and DoRA's ``.m``.
- Layout: ``lora_a`` is (in, r) and ``lora_b`` (r, out) (LoRALinear: y = x·Wᵀ + scale·(x·lora_a)·lora_b), so
  PEFT's lora_A (r, in) is lora_aᵀ and lora_B (out, r) is lora_bᵀ; read as transposed ``Decoded`` views of the
  file, written transposed. DoRA's ``m`` (out,) is PEFT's lora_magnitude_vector as it is.
- Scale: lora_parameters.scale is absolute (not alpha / r): the adapter gets r = rank and lora_alpha = scale·rank,
  so PEFT's alpha / r is MLX's scale. One rank and one scale for every module: a PEFT config with another rank
  or scale for some module (rank_pattern, alpha_pattern) is refused when written.
- Refused by name: fine_tune_type "full", a tensor of another leaf, a 3-D pair (LoRASwitchLinear: MoE
  experts), a LoRA on an embedding (its own layout: not read), a pair of another rank than the config's.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import AdapterConfigError, UnsupportedError
from ...io.checkpoint import Checkpoint, Decoded, FileSlice, TensorInfo, open_checkpoint, pread_into
from ...io.sidecar import config_bytes, read_json_object
from ...io.spool import SpoolWriter, folder_only
from ..config import CONFIG_NAME, AdapterConfig
from ..names import ROLE_A, ROLE_B, ROLE_MAGNITUDE, Role, saved_key, split_saved_key
from ..weights import LoraAdapter, adapter_from
from .base import AdapterFormat

if TYPE_CHECKING:
    import torch

    from .registry import Probe
else:
    from ..._lazy import torch

PREFIX = "adapters"  # adapters.safetensors, as mlx_lm.lora saves it
FILE = f"{PREFIX}.safetensors"
LEAVES: dict[str, Role] = {"lora_a": ROLE_A, "lora_b": ROLE_B, "m": ROLE_MAGNITUDE}
ROLE_LEAF = {role: leaf for leaf, role in LEAVES.items()}
FINE_TUNE_TYPES = ("lora", "dora")  # "full" is a whole model's layers, not an adapter
# Embedding modules (LoRAEmbedding: lora_a (vocab, r), lora_b (r, dims)): not read or written.
EMBEDDINGS = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings", "embed_in", "embeddings")
LAYER = re.compile(r"^(?:.*\.)?layers\.\d+\.(.+)$")  # a module inside model.layers: its name in the layer


def claims(probe: Probe) -> bool:
    """adapters.safetensors beside an adapter_config.json of mlx-lm (lora_parameters or fine_tune_type)."""
    if probe.path.is_file() and probe.path.name != FILE:
        return False
    if not (probe.has(FILE) and probe.has(CONFIG_NAME)):
        return False
    try:
        raw = json.loads((probe.folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and ("lora_parameters" in raw or "fine_tune_type" in raw)


def read(path: Path) -> LoraAdapter:
    """adapter_config.json and adapters.safetensors' headers as the common adapter (PEFT's names and layout)."""
    folder = path if path.is_dir() else path.parent
    return read_open(open_checkpoint(folder / FILE))


def read_open(ckpt: Checkpoint) -> LoraAdapter:
    """:func:`read`, from adapters.safetensors already open (the adapter owns the view made of it)."""
    folder = ckpt.folder
    rank, scale, dora, raw = _settings(folder / CONFIG_NAME)
    infos, modules = _peft_infos(ckpt, rank, dora)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": scale * rank,
        "target_modules": sorted(modules),
        "use_dora": dora,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": float(raw["lora_parameters"].get("dropout") or 0.0),
        "inference_mode": True,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": raw.get("model") if isinstance(raw.get("model"), str) else None,
    }
    view = Checkpoint(ckpt.root, ckpt.format, list(ckpt.files), infos, ckpt.metadata)
    return adapter_from(folder, AdapterConfig.from_dict(config), view)


def _settings(path: Path) -> tuple[int, float, bool, dict[str, Any]]:
    """(rank, scale, DoRA, the config) from mlx-lm's adapter_config.json; what is not an adapter refused."""
    raw = read_json_object(path, AdapterConfigError)
    kind = raw.get("fine_tune_type", "lora")  # load_adapters' default
    if kind == "full":
        raise UnsupportedError(
            f'{path}: fine_tune_type "full": MLX-LM\'s full fine-tune saves whole layers, not an adapter; '
            "load it with mlx-lm and save the model"
        )
    if kind not in FINE_TUNE_TYPES:
        raise AdapterConfigError(f"{path}: fine_tune_type {kind!r}: mlx-lm takes lora, dora or full")
    params = raw.get("lora_parameters")
    rank = params.get("rank") if isinstance(params, dict) else None
    scale = params.get("scale") if isinstance(params, dict) else None
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise AdapterConfigError(f"{path}: lora_parameters.rank must be a positive integer, got {rank!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise AdapterConfigError(f"{path}: lora_parameters.scale must be a finite number, got {scale!r}")
    return rank, float(scale), kind == "dora", raw


def _peft_infos(ckpt: Checkpoint, rank: int, dora: bool) -> tuple[list[TensorInfo], set[str]]:
    """The file's tensors under PEFT's saved names: lora_a and lora_b transposed when read, m as it is."""
    infos, modules = [], set()
    file = ckpt.files[0] if ckpt.files else ckpt.root
    for info in ckpt.infos():
        module, _, leaf = info.name.rpartition(".")
        role = LEAVES.get(leaf)
        if role is None or (role == ROLE_MAGNITUDE and not dora):
            raise UnsupportedError(
                f"{file}: tensor {info.name}: not an MLX-LM {'DoRA' if dora else 'LoRA'} tensor "
                f"(.lora_a, .lora_b{', .m' if dora else ''}); was it saved by mlx_lm.lora?"
            )
        if module.rsplit(".", 1)[-1] in EMBEDDINGS:
            raise UnsupportedError(f"{file}: {module}: a LoRA on an embedding (LoRAEmbedding), which is not read")
        want = 1 if role == ROLE_MAGNITUDE else 2
        if len(info.shape) != want:
            what = "stacked experts (LoRASwitchLinear)" if len(info.shape) == 3 else f"{len(info.shape)}-D"
            raise UnsupportedError(f"{file}: tensor {info.name}: {what}, which is not read")
        if role != ROLE_MAGNITUDE and info.shape[1 if role == ROLE_A else 0] != rank:
            raise AdapterConfigError(
                f"{file}: tensor {info.name} {list(info.shape)} is not of rank {rank} (lora_parameters.rank)"
            )
        name = saved_key(module, role)
        if role == ROLE_MAGNITUDE:
            infos.append(TensorInfo(name, info.dtype_name, info.shape, info.file, info.offset, key=info.file_key))
        else:
            decoded = Decoded((info,), _transposed)
            shape = (info.shape[1], info.shape[0])
            infos.append(TensorInfo(name, info.dtype_name, shape, info.file, None, key=info.name, decoded=decoded))
        modules.add(module)
    return infos, modules


def _transposed(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0].t().contiguous()


class MlxWriter(SpoolWriter):
    """An adapter folder as mlx-lm writes it: the tensors under MLX's names, lora_a / lora_b transposed, in one
    adapters.safetensors; adapter_config.json with fine_tune_type, num_layers and lora_parameters."""

    def __init__(self, out: str | os.PathLike[str], overwrite: bool = False):
        folder_only(out, "an MLX-LM adapter")
        super().__init__(out, prefix=PREFIX, overwrite=overwrite, metadata={"format": "mlx"})
        self._roles: dict[str, dict[Role, tuple[int, ...]]] = {}  # module -> role -> PEFT's shape

    def write(self, name: str, tensor: torch.Tensor | FileSlice) -> None:
        """One tensor under PEFT's saved name, written under MLX's (A and B transposed)."""
        module, role = split_saved_key(name)
        if role is None or role not in ROLE_LEAF:
            what = "a whole tensor (modules_to_save, a bias)" if role is None else f"PEFT's {role} tensor"
            what = "the base weight PEFT saves with an embedding or head target" if role == "base_weight" else what
            raise UnsupportedError(
                f"{self.out}: {name}: {what}; an MLX-LM adapter holds LoRA pairs (and DoRA's m) only"
            )
        data = _loaded(tensor) if isinstance(tensor, FileSlice) else tensor
        want = 1 if role == ROLE_MAGNITUDE else 2
        if data.dim() != want:
            raise UnsupportedError(f"{self.out}: {name}: a {data.dim()}-D tensor; MLX-LM's LoRALinear takes 2-D pairs")
        self._roles.setdefault(module, {})[role] = tuple(data.shape)
        out = data if role == ROLE_MAGNITUDE else data.t().contiguous()
        super().write(f"{module}.{ROLE_LEAF[role]}", out)

    def finish(self, config: Mapping[str, Any]) -> Path:
        """adapter_config.json for mlx-lm from the PEFT config, then the folder published whole."""
        self.add_file(CONFIG_NAME, config_bytes(self.mlx_config(config)))
        return self.commit()

    def mlx_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """mlx-lm's adapter_config.json for the modules written: one rank, one scale (refused otherwise)."""
        peft = AdapterConfig.from_dict(config)
        bad = peft.unsupported() + [f for f in ("lora_bias", "trainable_tokens") if f in peft.features()]
        if peft.raw.get("fan_in_fan_out"):
            bad.append("fan_in_fan_out (GPT-2's Conv1D layout)")
        if peft.target_parameters:  # mlx-lm's experts are SwitchLinear layers, whose LoRA is laid out its own way
            bad.append("target_parameters (a LoRA on stacked MoE experts)")
        if bad:
            raise UnsupportedError(f"{self.out}: MLX-LM's LoRALinear has no {', '.join(bad)}")
        ranks, scales = {}, {}
        for module, roles in self._roles.items():
            if ROLE_A not in roles or ROLE_B not in roles:
                raise AdapterConfigError(f"{self.out}: module {module!r} has no lora_A or no lora_B")
            ranks[module] = roles[ROLE_A][0]
            scales[module] = peft.scale(module, ranks[module])
            if peft.use_dora and ROLE_MAGNITUDE not in roles:
                raise AdapterConfigError(f"{self.out}: module {module!r}: a DoRA adapter without its magnitude")
        if not ranks:
            raise UnsupportedError(f"{self.out}: no LoRA pairs to write as an MLX-LM adapter")
        for what, values in (("rank", ranks), ("scale", scales)):
            if len(set(values.values())) > 1:
                found = ", ".join(f"{m}: {v:g}" for m, v in sorted(values.items())[:4])
                raise UnsupportedError(
                    f"{self.out}: modules of different {what}s ({found}, ...): MLX-LM's lora_parameters hold one "
                    f"{what} for every module; resize the adapter to one rank first (lorasurgeon resize --rank)"
                )
        keys = sorted({m[1] if (m := LAYER.match(name)) else name for name in ranks})
        params = {
            "rank": next(iter(ranks.values())),
            "scale": next(iter(scales.values())),
            "dropout": float(peft.raw.get("lora_dropout") or 0.0),
            "keys": keys,
        }
        # num_layers -1: every layer gets the keys' LoRA layers; those the file holds nothing for keep lora_b = 0
        out: dict[str, Any] = {"fine_tune_type": "dora" if peft.use_dora else "lora", "num_layers": -1}
        out["lora_parameters"] = params
        if peft.base_model:
            out["model"] = peft.base_model
        return out


def _loaded(piece: FileSlice) -> torch.Tensor:
    """A FileSlice's bytes read into memory as its tensor (a writer that changes the layout needs them)."""
    buf = torch.empty(piece.nbytes, dtype=torch.uint8)
    at = 0
    for part in piece.ranges():
        pread_into(part.path, buf[at : at + part.nbytes].numpy().data, part.offset)
        at += part.nbytes
    return buf.view(piece.dtype).reshape(piece.shape)


FORMAT = AdapterFormat(
    name="mlx",
    holds=f"MLX-LM ({CONFIG_NAME} + {FILE})",
    claims=claims,
    read=read,
    read_open=read_open,
    writer=MlxWriter,
)
