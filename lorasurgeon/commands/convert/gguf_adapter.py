"""convert ADAPTER --to gguf: a llama.cpp LoRA adapter, written as llama.cpp's own convert_lora_to_gguf.py
writes one (docs/formats.md §8), for the architectures done here.

- Architectures: those in ARCHITECTURES (``consumers.llama_cpp``, with what else llama.cpp refuses), whose
  classes in llama.cpp's converter (conversion/*.py) were read for what they do to linear weights: nothing but
  a rename, or LlamaModel's q/k row permutation (Llama, Mistral, Mixtral, OLMo). Others are refused by name,
  and so are per-expert LoRAs of MoE models (llama.cpp stacks the experts into one tensor per projection).
- Names: the base architecture's GGUF names from the ``gguf`` package's own TensorNameMap
  (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``), with ``.lora_a``/``.lora_b``.
- Tensors: each module's A and B read through the engine (``engine.execute.stream``, a ``PairOp`` per module):
  A (r, in) and B (out, r) as PEFT stores them (ggml reads them as {in, r} and {r, out});
  the token embedding's A transposed (llama.cpp's llm_build_inp_embd).
- LLaMA-family q/k: convert_hf_to_gguf's LlamaModel permutes the rows of q_proj and k_proj (HF's
  rotate-half RoPE layout to llama.cpp's interleaved one); a LoRA's rows are its B's, permuted alike.
- Base: its config.json names the architecture; where its folder holds weights, the adapter's shapes are
  checked against their headers by merge's own plan (an adapter merge refuses is refused here too).
- Scale: llama.cpp multiplies every pair by alpha / (its B's rank) with one alpha for the file, so each
  module's B carries s · r / alpha (s: PEFT's scale for that module, rsLoRA and patterns included).

The destination is checked before any tensor is read, by the rules of every result (``io.publish``: never
an input or inside one); the file is written beside it under a hidden name, fsynced and renamed: it appears
whole or not at all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapter.config import PEFT_DEFAULTS
from ...adapter.names import strip_prefix
from ...adapter.weights import LoraAdapter
from ...consumers.llama_cpp import LLAMA_CPP
from ...engine.execute import Outcome, stream
from ...engine.plan import Ref
from ...errors import (
    CorruptCheckpointError,
    InputNotFoundError,
    InvalidOptionError,
    UnsupportedError,
)
from ...io.checkpoint import FOLDER_LAYOUTS, open_checkpoint
from ...io.gguf_file import check_gguf_destination, gguf_module, staged_gguf
from ...io.layout import TensorSpec
from ...io.sidecar import CONFIG, read_json_object
from ...names import model_names
from ...ops.lora import LAYER_KINDS
from ...words import plural
from .._inputs import Input, adapters_of, is_gguf, open_inputs, plain_weights
from ..merge.plan import plan_merge

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class GgufReport:
    output: str | None
    architecture: str
    tensors: int  # lora_a + lora_b tensors written
    alpha: float
    dry_run: bool = False

    def summary(self) -> str:
        verb = "Would write" if self.dry_run else "Wrote"
        what = (
            f"a llama.cpp LoRA adapter for {self.architecture}, {plural(self.tensors, 'tensor')}, alpha {self.alpha:g}"
        )
        return f"{verb} {self.output}: {what}"


@dataclass(frozen=True)
class PairOp:
    """One module's pair as the GGUF file holds it (the engine's op of ``--to gguf``)."""

    name: str  # the GGUF tensor name, before .lora_a / .lora_b
    a: Ref
    b: Ref
    fold: float  # what B is multiplied by (llama.cpp applies alpha / rank to every pair)
    heads: int | None  # B's rows permuted as LlamaModel's q/k, in this many heads (None: kept)
    transpose_a: bool  # the token embedding's A (llama.cpp's llm_build_inp_embd)
    nbytes: int  # the float32 bytes of both
    byte_copy: TensorSpec | None = None  # every pair is computed

    def refs(self) -> list[Ref]:
        return [self.a, self.b]


def compute_pair(op: PairOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device) -> Outcome[None]:
    """A and B in float32, B scaled (and its rows permuted), A transposed for the token embedding."""
    a = tensors[op.a].to(torch.float32)
    b = tensors[op.b].to(torch.float32) * op.fold
    if op.heads is not None:
        b = permute_rows(b, op.heads)
    if op.transpose_a:
        a = a.t()
    return Outcome([(f"{op.name}.lora_a", a.contiguous()), (f"{op.name}.lora_b", b.contiguous())], None)


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute on the rows of ``w`` (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _base_folder(adapter: LoraAdapter, base: str | os.PathLike[str] | None) -> Path:
    """--base, else the adapter's base_model_name_or_path: a folder, or its config.json alone."""
    return Path(base) if base is not None else Path(str(adapter.config.base_model or ""))


def _base_config(where: Path) -> dict[str, Any]:
    config = where / CONFIG if where.is_dir() else where
    if not config.is_file():
        raise InputNotFoundError(
            f"{where}: no config.json of the base model (llama.cpp's names and q/k layout depend on it): "
            "give --base BASE"
        )
    return read_json_object(config, CorruptCheckpointError)


def _check_fits(adapter: LoraAdapter, where: Path, config: dict[str, Any]) -> None:
    """The adapter's modules against the base's headers, by merge's own plan (headers only), so that what
    merge refuses is refused here too; a base given by its config.json alone has no weights to check."""
    if not any((where / filename).is_file() for filename, _ in FOLDER_LAYOUTS):
        return
    with open_checkpoint(where) as ckpt:
        weights, _ = plain_weights(ckpt, config, role=f"{where}: the base model")
        names = model_names(weights.names(), config)
        plan_merge(weights, [adapter], [1.0], names, dtype=None)


def to_gguf(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    base: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
) -> GgufReport:
    """A PEFT LoRA adapter as a llama.cpp GGUF adapter file.

    Args:
        adapter: a PEFT adapter folder.
        out: the .gguf file to write (None with ``dry_run``).
        base: the base model's folder (or its config.json); default: the adapter's base_model_name_or_path.
        overwrite: replace ``out`` if it exists. dry_run: check everything, write nothing.

    Returns:
        A GgufReport.

    Raises:
        UnsupportedError: an architecture not done here, or what llama.cpp cannot take (DoRA, biases, whole
            tensors, trainable tokens, stacked experts, a head tied to the embedding).
        IncompatibleError: an adapter whose shapes do not fit the base's weights (as merge refuses it).
        InputNotFoundError: no base config. CorruptCheckpointError: a base config.json that is not a JSON object.
        OutputError: ``out`` is, or is inside, an input (or a protected folder), or not an earlier .gguf to replace.
        OutputExistsError: ``out`` exists (without ``overwrite``).
    """
    if is_gguf(adapter):
        raise UnsupportedError(f"{adapter} is a llama.cpp GGUF adapter already: --to gguf writes one from another")
    gguf = gguf_module("--to gguf")
    # out=None: a .gguf is one file, whose place is checked below (check_gguf_destination), not a result folder
    adapter_input = Input(adapter, "ADAPTER", "adapter")
    with open_inputs([adapter_input], None, command="convert", overwrite=False, device="cpu") as opened:
        (loaded,) = adapters_of(opened)
    source = opened[0].source
    try:
        where = _base_folder(loaded, base)
        config = _base_config(where)
        path = None if out is None else check_gguf_destination(out, [source.path, where], overwrite=overwrite)
        arch, arch_name, permuted = LLAMA_CPP.gguf_architecture(config)
        found = LLAMA_CPP.gguf_refusals(loaded, config, arch)
        if found:
            raise UnsupportedError(f"{source.label}: {LLAMA_CPP.label} cannot take {'; '.join(found)}")
        _check_fits(loaded, where, config)
        model_arch = getattr(gguf.MODEL_ARCH, arch_name)
        alpha = _file_alpha(loaded)
        names = gguf.get_tensor_name_map(model_arch, int(_hparam(config, "num_hidden_layers", "n_layer")))
        ops = plan_pairs(loaded, config, names, arch_name, alpha, permuted=permuted)
        if dry_run:
            return GgufReport(None if out is None else str(out), arch, 2 * len(ops), alpha, True)
        if path is None:
            raise InvalidOptionError("an output file is needed (or use dry_run)")
        pairs = list(stream(ops, [loaded.checkpoint], compute=compute_pair))
        _write(path, gguf.MODEL_ARCH_NAMES[model_arch], alpha, pairs, overwrite=overwrite)
        return GgufReport(str(out), arch, len(pairs), alpha)
    finally:
        loaded.close()


def _file_alpha(adapter: LoraAdapter) -> float:
    """The file's one alpha: the adapter's lora_alpha (PEFT's default where it names none); an alpha of 0
    (PEFT: every scale 0) is written as the default, every B then scaled to zero (llama.cpp reads 0 as none)."""
    return adapter.config.lora_alpha or float(PEFT_DEFAULTS["lora_alpha"])


def plan_pairs(
    adapter: LoraAdapter, config: dict[str, Any], names: Any, arch_name: str, alpha: float, *, permuted: bool
) -> list[PairOp]:
    """A PairOp per module, from headers: its GGUF name (gguf's TensorNameMap), its A and B (their roles by
    layer kind), B's fold for one ``alpha``, the heads its q/k rows are permuted in where ``permuted`` (LlamaModel's
    layout), whether A is transposed; a module llama.cpp has no tensor for, or not a matrix pair, refused by name."""
    n_head = int(_hparam(config, "num_attention_heads", "n_head"))
    n_kv = int(config.get("num_key_value_heads") or n_head)
    heads = {"self_attn.q_proj": n_head, "self_attn.k_proj": n_kv} if permuted else {}
    ops = []
    for module in adapter.modules.values():
        hf = strip_prefix(module.name)
        target = names.get_name(f"{hf}.weight", try_suffixes=(".weight",))
        if target is None:
            raise UnsupportedError(f"{hf}: llama.cpp's {arch_name} has no tensor for it")
        a_key, b_key = (module.keys[role] for role in LAYER_KINDS[module.kind].lora_roles)
        a, b = adapter.checkpoint.info(a_key), adapter.checkpoint.info(b_key)
        if len(a.shape) != 2:
            raise UnsupportedError(f"{hf}: a {module.kind} LoRA is not a matrix pair llama.cpp reads")
        fold = LLAMA_CPP.fold(module.scale, a.shape[0], alpha)  # llama.cpp applies alpha / rank
        permute = next((n for suffix, n in heads.items() if hf.endswith(suffix)), None)
        nbytes = 4 * (math.prod(a.shape) + math.prod(b.shape))
        ops.append(PairOp(target, Ref(0, a_key), Ref(0, b_key), fold, permute, target.startswith("token_embd"), nbytes))
    return ops


def _hparam(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in config:
            return config[key]
    raise InvalidOptionError(f"the base's config.json has no {keys[0]} (llama.cpp's names depend on it)")


def _write(out: Path, arch: str, alpha: float, pairs: list[tuple[str, torch.Tensor]], *, overwrite: bool) -> None:
    """The file written beside ``out`` (checked by check_gguf_destination) under a hidden name, fsynced, renamed."""
    gguf = gguf_module("--to gguf")
    with staged_gguf(out, overwrite=overwrite) as partial:
        writer = gguf.GGUFWriter(str(partial), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, tensor in pairs:
            writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
