"""convert ADAPTER --to gguf: a llama.cpp LoRA adapter, written as llama.cpp's own convert_lora_to_gguf.py
writes one (docs/formats.md §8), for the architectures done here.

- Architectures: those in ARCHITECTURES (``consumers.llama_cpp``, with what else llama.cpp refuses), whose
  classes in llama.cpp's converter (conversion/*.py) were read for what they do to linear weights: nothing but
  a rename, or LlamaModel's q/k row permutation (Llama, Mistral, Mixtral, OLMo). Others are refused by name,
  and so are per-expert LoRAs of MoE models (llama.cpp stacks the experts into one tensor per projection).
- Names: the base architecture's GGUF names from the ``gguf`` package's own TensorNameMap
  (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``), with ``.lora_a``/``.lora_b``.
- Tensors: A (r, in) and B (out, r) as PEFT stores them (ggml reads them as {in, r} and {r, out});
  the token embedding's A transposed (llama.cpp's llm_build_inp_embd).
- LLaMA-family q/k: convert_hf_to_gguf's LlamaModel permutes the rows of q_proj and k_proj (HF's
  rotate-half RoPE layout to llama.cpp's interleaved one); a LoRA's rows are its B's, permuted alike.
- Base: its config.json names the architecture; where its folder holds weights, the adapter's shapes are
  checked against their headers by merge's own plan (an adapter merge refuses is refused here too).
- Scale: llama.cpp multiplies every pair by alpha / (its B's rank) with one alpha for the file, so each
  module's B carries s · r / alpha (s: PEFT's scale for that module, rsLoRA and patterns included).

The file is written beside its destination under a hidden name, fsynced and renamed: it appears
whole or not at all.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter.weights import LoraAdapter, load_adapter
from ..consumers.llama_cpp import ARCHITECTURES as ARCHITECTURES
from ..consumers.llama_cpp import LLAMA_CPP
from ..errors import (
    CorruptCheckpointError,
    InputNotFoundError,
    InvalidOptionError,
    LorasurgeonError,
    OutputError,
    OutputExistsError,
    UnsupportedError,
)
from ..io.checkpoint import FOLDER_LAYOUTS, open_checkpoint
from ..io.destination import absolute, check_replaceable, earlier_file
from ..io.publish import publish
from ..io.scratch import make_scratch, release
from ..io.sidecar import CONFIG, read_json_object
from ..names import model_names
from ..words import plural
from ._inputs import Input, plain_weights, prepare
from .merge.plan import plan_merge

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch


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
        OutputExistsError: ``out`` exists (without ``overwrite``).
    """
    gguf = _gguf()
    (source,) = prepare([Input(adapter, "ADAPTER", "adapter")], None, command="convert", overwrite=False, device="cpu")
    loaded = load_adapter(source.path)
    try:
        where = _base_folder(loaded, base)
        config = _base_config(where)
        arch, arch_name, permuted = LLAMA_CPP.gguf_architecture(config)
        found = LLAMA_CPP.gguf_refusals(loaded, config, arch)
        if found:
            raise UnsupportedError(f"{source.label}: {LLAMA_CPP.label} cannot take {'; '.join(found)}")
        _check_fits(loaded, where, config)
        model_arch = getattr(gguf.MODEL_ARCH, arch_name)
        names = gguf.get_tensor_name_map(model_arch, int(_hparam(config, "num_hidden_layers", "n_layer")))
        n_head = int(_hparam(config, "num_attention_heads", "n_head"))
        n_kv = int(config.get("num_key_value_heads") or n_head)
        alpha = float(loaded.config.raw.get("lora_alpha") or 8)
        pairs: list[tuple[str, torch.Tensor]] = []
        for module in loaded.modules.values():
            hf = module.name.removeprefix("base_model.model.")
            target = names.get_name(f"{hf}.weight", try_suffixes=(".weight",))
            if target is None:
                raise UnsupportedError(f"{hf}: llama.cpp's {arch_name} has no tensor for it")
            roles = ("emb_A", "emb_B") if module.kind == "embedding" else ("A", "B")
            a = loaded.checkpoint.read(module.keys[roles[0]]).to(torch.float32)
            b = loaded.checkpoint.read(module.keys[roles[1]]).to(torch.float32)
            if a.dim() != 2:
                raise UnsupportedError(f"{hf}: a {module.kind} LoRA is not a matrix pair llama.cpp reads")
            b = b * LLAMA_CPP.fold(module.scale, a.shape[0], alpha)  # llama.cpp applies alpha / rank
            if permuted and hf.endswith("self_attn.q_proj"):
                b = permute_rows(b, n_head)
            elif permuted and hf.endswith("self_attn.k_proj"):
                b = permute_rows(b, n_kv)
            if target.startswith("token_embd"):
                a = a.t()
            pairs += [(f"{target}.lora_a", a.contiguous()), (f"{target}.lora_b", b.contiguous())]
        if dry_run:
            return GgufReport(None if out is None else str(out), arch, len(pairs), alpha, True)
        if out is None:
            raise InvalidOptionError("an output file is needed (or use dry_run)")
        _write(Path(out), gguf.MODEL_ARCH_NAMES[model_arch], alpha, pairs, overwrite=overwrite)
        return GgufReport(str(out), arch, len(pairs), alpha)
    finally:
        loaded.close()


def _hparam(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in config:
            return config[key]
    raise InvalidOptionError(f"the base's config.json has no {keys[0]} (llama.cpp's names depend on it)")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UnsupportedError(
            "--to gguf needs the gguf package: pip install 'lorasurgeon[gguf]' (or pip install gguf)"
        ) from None
    return gguf


def _write(out: Path, arch: str, alpha: float, pairs: list[tuple[str, torch.Tensor]], *, overwrite: bool) -> None:
    gguf = _gguf()

    out = absolute(out)
    gguf_file = earlier_file("GGUF", b"GGUF")
    if out.is_dir():
        raise OutputExistsError(f"{out}: a folder; --to gguf writes one file (e.g. -o adapter.gguf)")
    if os.path.lexists(out):
        if not overwrite:
            raise OutputExistsError(f"{out}: already exists (pass --overwrite to replace an earlier result)")
        check_replaceable(out, gguf_file)
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: no such folder")
    scratch = make_scratch(out, "partial")
    partial = scratch / out.name
    try:
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
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        publish(partial, out, overwrite=overwrite, not_replaceable=gguf_file)
    except OSError as exc:
        if isinstance(exc, LorasurgeonError):
            raise
        raise OutputError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        release(scratch)
