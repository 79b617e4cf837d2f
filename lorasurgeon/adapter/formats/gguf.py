"""llama.cpp's GGUF LoRA adapters (docs/formats.md §8), read back into the common adapter -- given the base model.

A .gguf adapter holds llama.cpp's tensor names (``blk.0.attn_q.weight.lora_a``), one alpha and no config:
which module each pair adapts, and how its rows were laid out, are the base's. So it is read against the base
model's folder: its config.json (the architecture, the head counts) and its weights' headers (their names).

- Names: gguf's own TensorNameMap for the base's architecture (those of ``consumers.llama_cpp.ARCHITECTURES``, as
  ``convert --to gguf`` writes them), run over the base's in-memory weight names (``names.model_names``: PEFT's
  names) and turned round; a GGUF name no base weight maps to is refused by name.
- Layout: ``lora_a`` (r, in) and ``lora_b`` (out, r) are PEFT's lora_A and lora_B as they are; the token
  embedding's ``lora_a`` (vocab, r) is transposed back into lora_embedding_A (r, vocab), its ``lora_b`` (hidden, r)
  is lora_embedding_B; for LlamaModel's architectures (Llama, Mistral, Mixtral, OLMo) the rows of q and k's B are
  put back from llama.cpp's interleaved RoPE order into HF's (the inverse of LlamaModel.permute).
- Tensors: F32, F16 and BF16 read where they lie (one pread); quantized ones (Q8_0, ...) dequantized to float32
  by gguf's own ``gguf.quants.dequantize`` when read; the transposes and permutations are ``Decoded`` views. Only
  headers are read here.
- Scale: llama.cpp computes alpha / rank · B·A per pair (rank: B's ggml ne[0]; alpha 0: B·A alone). The adapter
  gets lora_alpha = the file's alpha and each module's r from its tensors (rank_pattern where they differ), so
  PEFT computes the same ΔW. What the file does not hold cannot come back: rsLoRA, alpha_pattern and a module's own
  scale were folded into its B (``convert --to gguf``) or dropped (llama.cpp's converter reads lora_alpha alone),
  dropout and training settings are gone, target_modules is what the pairs cover.
- Refused by name: a model .gguf, a control vector, aLoRA, a big-endian file, a base of another architecture,
  stacked (3-D) experts, an unpaired half, a suffix llama.cpp's loader refuses, a pair that does not fit the base.
  ``*_norm.weight`` tensors (mergekit's, passed through by the converter) are left out, as llama.cpp's loader
  leaves them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ...errors import CorruptCheckpointError, IncompatibleError, InputNotFoundError, UnsupportedError
from ...io.checkpoint import Checkpoint, CheckpointFormat, Decoded, TensorInfo, open_checkpoint
from ...io.gguf_file import SUFFIX, GgufTensor, gguf_module, open_reader, scalar, tensor_header, text
from ..config import AdapterConfig
from ..names import ROLE_A, ROLE_B, ROLE_EMB_A, ROLE_EMB_B, saved_key
from ..weights import LoraAdapter, adapter_from
from .base import AdapterFormat

if TYPE_CHECKING:
    import torch

    from ...names import ModelNames
    from .registry import Probe
else:
    from ..._lazy import torch

LORA_A, LORA_B = ".lora_a", ".lora_b"
NORM = "_norm.weight"  # llama.cpp's loader skips these (mergekit's layer norms, passed through by the converter)
PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # ggml type -> the dtype read where it lies
GGUF_FORMAT: CheckpointFormat = "gguf"  # Checkpoint.format of the view


@dataclass(frozen=True)
class GgufAdapter:
    """A GGUF LoRA adapter's headers: general.architecture, adapter.lora.alpha, its tensors."""

    path: Path
    arch: str
    alpha: float
    tensors: dict[str, GgufTensor]


def claims(probe: Probe) -> bool:
    """A .gguf file whose general.type is "adapter" (or absent) and adapter.type "lora" (headers only, no torch);
    without the gguf package every .gguf is claimed, and reading it says what is needed."""
    path = probe.path
    if path.suffix.lower() != SUFFIX or not path.is_file():
        return False
    try:
        import gguf
    except ImportError:
        return True
    try:
        reader = gguf.GGUFReader(os.fspath(path), "r")
    except (OSError, ValueError, IndexError, KeyError, OverflowError, TypeError):
        return False
    return text(reader, "general.type") in ("adapter", None) and text(reader, "adapter.type") == "lora"


def read(path: Path) -> LoraAdapter:
    """The registry's read: a GGUF adapter cannot be read without its base model."""
    raise UnsupportedError(
        f"{path}: a llama.cpp GGUF adapter holds llama.cpp's names and layout, not the model's: "
        "it is read against its base model (give --base BASE)"
    )


def read_gguf_adapter(path: Path, base: Path) -> LoraAdapter:
    """A llama.cpp GGUF LoRA adapter as the common adapter (PEFT's names and layout), read against ``base``.

    Args:
        path: the .gguf adapter file.
        base: the base model's folder (config.json and its weights; only their headers are read).

    Returns:
        A LoraAdapter (format "gguf") whose tensors are read from the .gguf when asked; close() it.

    Raises:
        UnsupportedError: not a GGUF LoRA adapter, or one this cannot take (see the module's docstring), by name;
            the gguf package not installed.
        IncompatibleError: a base of another architecture, or one the pairs do not fit.
        InputNotFoundError, CorruptCheckpointError: a file that is missing or cannot be read.
    """
    if Path(base).suffix.lower() != ".gguf":  # a GGUF model base carries its config (io.gguf_model)
        _need_config(Path(base))
    with open_checkpoint(base) as ckpt:
        return adapter_with_base(path, ckpt)


def adapter_with_base(path: Path, base: Checkpoint) -> LoraAdapter:
    """:func:`read_gguf_adapter` with the base's checkpoint already open (its headers not read again)."""
    from ...consumers.llama_cpp import LLAMA_CPP
    from ...io.sidecar import read_config

    gguf = gguf_module("reading a GGUF adapter")
    found = read_header(Path(path))
    if base.format != "gguf":  # a GGUF model base carries its config (io.gguf_model)
        _need_config(base.folder)
    config = read_config(base)
    arch, arch_name, permuted = LLAMA_CPP.gguf_architecture(config)
    model_arch = getattr(gguf.MODEL_ARCH, arch_name)
    if gguf.MODEL_ARCH_NAMES[model_arch] != found.arch:
        raise IncompatibleError(
            f"{path}: an adapter for llama.cpp's {found.arch!r}, but the base {base.root} is {arch} "
            f"({gguf.MODEL_ARCH_NAMES[model_arch]!r}): give --base the model it was made for"
        )
    weights, names = _base_names(base, config)
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
    modules = _module_map(names, gguf.get_tensor_name_map(model_arch, layers))
    heads = _heads(config) if permuted else {}
    infos, ranks, kinds = [], {}, {}
    for target, (a, b) in _pairs(found).items():
        if target not in modules:
            raise IncompatibleError(f"{path}: {target}: no weight of the base {base.root} ({arch}) is named so")
        module, kind = modules[target]
        _check_fits(found, target, a, b, weights.info(_file_key(names, module)).shape, kind)
        permute = next((n for suffix, n in heads.items() if module.endswith(suffix)), None)
        infos += _module_infos(found, module, kind, a, b, permute)
        ranks[module], kinds[module] = a.shape[0] if kind != "embedding" else a.shape[1], kind
    cfg = _config(found, ranks, kinds, names, base.root)
    ckpt = Checkpoint(found.path, GGUF_FORMAT, [found.path], infos, {})
    return replace(adapter_from(found.path, cfg, ckpt), format=FORMAT.name)


def _need_config(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise InputNotFoundError(
            f"{folder}: no config.json of the base model (a GGUF adapter's names and q/k layout depend on it): "
            "give --base BASE, the base model's folder"
        )


def read_header(path: Path) -> GgufAdapter:
    """The headers of a GGUF LoRA adapter; anything else refused by name.

    Raises:
        UnsupportedError: a model .gguf, a control vector, aLoRA, a big-endian file; no gguf package.
        CorruptCheckpointError: a file gguf's reader cannot parse. InputNotFoundError: no such file.
    """
    reader = open_reader(path, "reading a GGUF adapter")
    kind, adapter = text(reader, "general.type"), text(reader, "adapter.type")
    if kind not in ("adapter", None) or adapter != "lora":
        what = f"a llama.cpp {kind or 'model'} file" if adapter is None else f"a llama.cpp {adapter} adapter"
        raise UnsupportedError(f"{path}: {what}, not a LoRA adapter (general.type 'adapter', adapter.type 'lora')")
    if "adapter.alora.invocation_tokens" in reader.fields:
        raise UnsupportedError(f"{path}: an aLoRA adapter (adapter.alora.invocation_tokens), which is not read")
    if reader.byte_order != "I":
        raise UnsupportedError(f"{path}: a big-endian GGUF file (--bigendian), which is not read")
    alpha = scalar(reader, "adapter.lora.alpha")
    arch = text(reader, "general.architecture")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or arch is None:
        raise CorruptCheckpointError(f"{path}: a GGUF adapter without adapter.lora.alpha or general.architecture")
    tensors = {t.name: tensor_header(t) for t in reader.tensors}
    size = path.stat().st_size
    for t in tensors.values():
        if t.offset + t.nbytes > size:
            raise CorruptCheckpointError(f"{path}: tensor {t.name} runs past the end of the file: truncated")
    return GgufAdapter(path, arch, float(alpha), tensors)


def _base_names(base: Checkpoint, config: Mapping[str, Any]) -> tuple[Checkpoint, ModelNames]:
    """The base as plain weights (a quantized one's plain shapes) and its names."""
    from ...formats.layout import dequantized, find_layout
    from ...names import model_names

    layout = find_layout(base, config)
    weights = base if layout is None else dequantized(base, layout)
    return weights, model_names(weights.names(), config)


def _module_map(names: ModelNames, tmap: Any) -> dict[str, tuple[str, str]]:
    """GGUF weight name -> (the base's in-memory module, the layer PEFT wraps it as), for every module PEFT can
    adapt with a matrix pair; a GGUF name two modules map to is left out (a pair for it is refused by name)."""
    found: dict[str, tuple[str, str]] = {}
    twice = set()
    for weight in names.file_of:
        module, _, leaf = weight.rpartition(".")
        kind = names.layers.get(module)
        if leaf != "weight" or kind not in ("linear", "conv1d", "embedding"):
            continue
        target = tmap.get_name(weight, try_suffixes=(".weight",))
        if target is None:
            continue
        if target in found and found[target][0] != module:
            twice.add(target)
        found[target] = (module, cast(str, kind))
    return {k: v for k, v in found.items() if k not in twice}


def _file_key(names: ModelNames, module: str) -> str:
    key = names.file_key(f"{module}.weight")
    assert key is not None  # _module_map took only weights the files hold whole
    return key


def _heads(config: Mapping[str, Any]) -> dict[str, int]:
    """The heads q and k's rows were permuted in (LlamaModel.permute: n_head for q, n_head_kv for k)."""
    n_head = int(config.get("num_attention_heads") or config.get("n_head") or 0)
    n_kv = int(config.get("num_key_value_heads") or n_head)
    return {"self_attn.q_proj": n_head, "self_attn.k_proj": n_kv}


def _pairs(found: GgufAdapter) -> dict[str, tuple[GgufTensor, GgufTensor]]:
    """GGUF weight name -> (lora_a, lora_b); norms left out; what llama.cpp's loader refuses, refused by name."""
    halves: dict[str, dict[str, GgufTensor]] = {}
    for name, t in found.tensors.items():
        if name.endswith(NORM):
            continue
        suffix = LORA_A if name.endswith(LORA_A) else LORA_B if name.endswith(LORA_B) else None
        if suffix is None:
            raise UnsupportedError(f"{found.path}: tensor {name}: not a .lora_a / .lora_b (llama.cpp refuses it too)")
        halves.setdefault(name[: -len(suffix)], {})[suffix] = t
    pairs = {}
    for target, half in halves.items():
        if len(half) != 2:
            raise CorruptCheckpointError(f"{found.path}: {target}: {next(iter(half))} without its other half")
        a, b = half[LORA_A], half[LORA_B]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise UnsupportedError(
                f"{found.path}: {target}: a {len(a.shape)}-D pair (stacked experts), which is not read"
            )
        pairs[target] = (a, b)
    if not pairs:
        raise UnsupportedError(f"{found.path}: a GGUF adapter with no LoRA pairs")
    return pairs


def _check_fits(
    found: GgufAdapter, target: str, a: GgufTensor, b: GgufTensor, weight: tuple[int, ...], kind: str
) -> None:
    """The pair against the base weight, as llama.cpp's loader checks it (llama-adapter.cpp): a linear's
    (out, in) is (b rows, a cols); a Conv1D's and an embedding's weight is the other way round; token_embd's
    a is (vocab, r), its b (hidden, r)."""
    if kind == "embedding":
        rank_a, rank_b, want = a.shape[1], b.shape[1], (a.shape[0], b.shape[0])
    else:
        rank_a, rank_b = a.shape[0], b.shape[1]
        want = (b.shape[0], a.shape[1]) if kind == "linear" else (a.shape[1], b.shape[0])
    if rank_a != rank_b or tuple(weight) != want:
        raise IncompatibleError(
            f"{found.path}: {target}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not fit the base's "
            f"weight {list(weight)} (an adapter of another model?)"
        )


def _module_infos(
    found: GgufAdapter, module: str, kind: str, a: GgufTensor, b: GgufTensor, heads: int | None
) -> list[TensorInfo]:
    """The module's two tensors under PEFT's saved names, as views of the file: token_embd's A transposed back,
    q/k's B rows put back in HF's order (heads: LlamaModel's permutation undone)."""
    embedding = kind == "embedding"
    a_info = _stored(found, a, saved_key(module, ROLE_EMB_A if embedding else ROLE_A))
    b_info = _stored(found, b, saved_key(module, ROLE_EMB_B if embedding else ROLE_B))
    if embedding:
        a_info = _view(a_info, (a.shape[1], a.shape[0]), _transposed)
    if heads:
        if b.shape[0] % (2 * heads):
            raise IncompatibleError(f"{found.path}: {b.name}: {b.shape[0]} rows do not split into {heads} heads")
        b_info = _view(b_info, b.shape, partial(_unpermuted, heads))
    return [a_info, b_info]


def _stored(found: GgufAdapter, t: GgufTensor, name: str) -> TensorInfo:
    """The tensor ``t`` under ``name``: its bytes where they lie, or, quantized, dequantized when read."""
    if t.ggml in PLAIN:
        return TensorInfo(name, PLAIN[t.ggml], t.shape, found.path, t.offset, key=t.name)
    gguf = gguf_module("reading a GGUF adapter")
    qtype = gguf.GGMLQuantizationType[t.ggml]
    if t.ggml.startswith(("I", "F")) or qtype not in getattr(gguf.quants, "_type_traits", {qtype: None}):
        raise UnsupportedError(f"{found.path}: {t.name} is stored as {t.ggml}, which is not read")
    raw = TensorInfo(t.name, "U8", (t.nbytes,), found.path, t.offset)
    decode = partial(_dequantize, qtype, t.shape)
    return TensorInfo(name, "F32", t.shape, found.path, None, key=t.name, decoded=Decoded((raw,), decode))


def _view(info: TensorInfo, shape: tuple[int, ...], fn: Any) -> TensorInfo:
    """``info`` under its name, as ``fn`` of it when read (its dtype kept: a transpose or a row order)."""
    part = TensorInfo(info.key or info.name, info.dtype_name, info.shape, info.file, info.offset, decoded=info.decoded)
    return TensorInfo(info.name, info.dtype_name, shape, info.file, None, key=info.key, decoded=Decoded((part,), fn))


def _dequantize(qtype: Any, shape: tuple[int, ...], parts: list[torch.Tensor]) -> torch.Tensor:
    import gguf

    data = gguf.quants.dequantize(parts[0].numpy().reshape(*shape[:-1], -1), qtype)
    return torch.from_numpy(data.reshape(shape).astype("float32", copy=False))


def _transposed(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0].t().contiguous()


def _unpermuted(n_head: int, parts: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of convert_hf_to_gguf's LlamaModel.permute on the rows of ``w`` (interleaved -> rotate-half)."""
    w = parts[0]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).contiguous()


def _config(
    found: GgufAdapter, ranks: dict[str, int], kinds: dict[str, str], names: ModelNames, base: Path
) -> AdapterConfig:
    """PEFT's config computing what llama.cpp does: lora_alpha the file's alpha, r the commonest rank and
    rank_pattern the others (by full module name); an alpha of 0 (llama.cpp: B·A unscaled) as alpha = r."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in ranks.items() if k != r}
    raw = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": found.alpha or r,
        "rank_pattern": pattern,
        "alpha_pattern": {m: float(k) for m, k in pattern.items()} if not found.alpha else {},
        "target_modules": _targets(sorted(ranks), names),
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": "conv1d" in kinds.values(),
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "inference_mode": True,
        "task_type": names.task_type,
        "base_model_name_or_path": str(base),
    }
    return AdapterConfig.from_dict(raw)


def _targets(modules: list[str], names: ModelNames) -> list[str]:
    """target_modules: the modules' last names where those name exactly the modules adapted, else their full names."""
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    covered = {m for m, kind in names.layers.items() if kind is not None and m.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if covered == set(modules) else modules


FORMAT = AdapterFormat(
    name="gguf",
    holds="llama.cpp GGUF LoRA (a .gguf file, read against its base model)",
    claims=claims,
    read=read,
    read_with_base=adapter_with_base,
)
