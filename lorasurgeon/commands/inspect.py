"""Describe a checkpoint or adapter from its headers: the ``inspect`` command."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..adapter.config import CONFIG_NAME, AdapterConfig
from ..adapter.weights import load_adapter
from ..errors import LorasurgeonError
from ..formats.detect import Quantization, detect
from ..formats.layout import find_layout
from ..hub.source import resolve
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.sidecar import read_config
from ..names.builtin import is_tied
from ..words import plural
from ._inputs import input_kind
from .inspect_adapter import AdapterReport, adapter_lines, adapter_report, read_as_named
from .inspect_gguf import GgufReport, is_gguf, read_gguf


@dataclass(frozen=True)
class DtypeCount:
    tensors: int
    parameters: int


@dataclass(frozen=True)
class QuantizedWeights:
    """The quantized weights of a checkpoint as lorasurgeon reads them (dequantized), or why it cannot."""

    methods: list[str]  # the formats, e.g. ["block FP8"]
    weights: int  # quantized weights found
    unsupported: str | None = None  # the refusal, for a format or layout it does not read


@dataclass(frozen=True)
class ModelArchitecture:
    """A model's shape as its config.json says (numbers from ``text_config`` where the top level has none, as
    in multimodal configs); what the config does not say is None (and not shown in the table)."""

    model_type: str | None = None
    architecture: str | None = None  # architectures[0], the transformers class
    layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    attention_heads: int | None = None
    kv_heads: int | None = None
    vocab_size: int | None = None
    tied_embeddings: bool | None = None  # tie_word_embeddings, else the class's default (names.builtin.is_tied)
    dtype: str | None = None
    quantization: str | None = None  # config.json's quant_method (formats.detect)


@dataclass(frozen=True)
class CheckpointReport:
    """What ``inspect`` reports. ``to_dict()`` is the ``--json`` document."""

    path: str
    format: str
    files: list[str]
    tensors: int
    parameters: int
    bytes: int
    dtypes: dict[str, DtypeCount]
    metadata: dict[str, str]
    adapter: AdapterReport | None
    quantization: Quantization | None = None  # how the weights are quantized (what showed it first)
    form: str = "model"  # model | adapter | augmented (a model with the LoRA layers inside)
    quantized: QuantizedWeights | None = None  # what lorasurgeon reads of it
    architecture: ModelArchitecture | None = None  # a model's, from its config.json
    gguf: GgufReport | None = None  # a .gguf file's (format "gguf")

    def to_dict(self) -> dict:
        return asdict(self)


def inspect(path: str | os.PathLike[str]) -> CheckpointReport:
    """Describe a model, adapter (in any format the registry reads) or augmented checkpoint from its headers (no
    tensor data is read).

    Args:
        path: a folder, a single .safetensors/.bin/.gguf file, or a Hub repo id ``org/name[@revision]``.

    Returns:
        A CheckpointReport: format, files, tensor and parameter counts by dtype, its form (model,
        adapter, augmented), a model's architecture from its config.json, the adapter's modules with
        rank/alpha/scale, and any quantization; for a .gguf (a llama.cpp adapter or model) its ``gguf``
        entry. Its ``to_dict()`` is ``inspect --json``.

    Raises:
        InputNotFoundError: no such local path, or no such Hub repo or revision.
        CorruptCheckpointError, UnsafeCheckpointError: a file that cannot be read safely.
        AdapterConfigError: an adapter whose adapter_config.json is invalid.
        UnsupportedError: a .gguf, without the gguf package installed.
    """
    root = resolve(path, in_place=True)  # a Hub repo's headers by range: no weights downloaded
    if is_gguf(root):
        return _gguf_report(root)
    ckpt = open_checkpoint(root)
    form = input_kind(ckpt)
    has_config = ckpt.folder.joinpath(CONFIG_NAME).is_file()
    adapter = None
    if form == "adapter" and has_config:
        ckpt.close()
        adapter = load_adapter(ckpt.folder)
        ckpt = adapter.checkpoint
    elif form == "adapter" and (named := read_as_named(ckpt)) is not None:  # a kohya / diffusers file
        adapter = named
        adapter.close()  # headers only: the counts below are the file's own (its alphas too)
    elif form == "augmented" and has_config:  # the adapter inside, read as convert reads it
        from .merge.augmented import split_augmented  # the merge package only for this kind of checkpoint

        _, adapter, _ = split_augmented(ckpt, AdapterConfig.load(ckpt.folder), read_config(ckpt))
    files = [ckpt.index_file] if ckpt.index_file else []
    files += list(ckpt.files)
    config = read_config(ckpt)
    report = CheckpointReport(
        path=str(root),
        format=ckpt.format,
        files=[str(_rel(f, ckpt.folder)) for f in files],
        tensors=len(ckpt),
        parameters=sum(i.numel for i in ckpt.infos()),
        bytes=ckpt.nbytes,
        dtypes=_dtypes((i.dtype_name, i.numel) for i in ckpt.infos()),
        metadata=dict(ckpt.metadata),
        adapter=adapter_report(adapter) if adapter else None,
        quantization=detect(((i.name, i.dtype_name) for i in ckpt.infos()), config),
        form=form,
        quantized=_quantized(ckpt),
        architecture=model_architecture(config) if form != "adapter" and config else None,
    )
    ckpt.close()
    return report


def _dtypes(tensors: Iterable[tuple[str, int]]) -> dict[str, DtypeCount]:
    """(dtype, parameters) of each tensor -> tensors and parameters by dtype."""
    counts: dict[str, list[int]] = {}
    for dtype, numel in tensors:
        c = counts.setdefault(dtype, [0, 0])
        c[0] += 1
        c[1] += numel
    return {k: DtypeCount(*v) for k, v in sorted(counts.items())}


# ModelArchitecture field -> config.json keys that hold it (transformers' attribute_map aliases after the first)
_CONFIG_KEYS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"),
    "vocab_size": ("vocab_size",),
}


def model_architecture(config: dict[str, Any]) -> ModelArchitecture:
    """A model's architecture from its config.json alone (no transformers, no torch)."""
    text = config.get("text_config")
    docs = [config] + ([text] if isinstance(text, dict) else [])
    numbers = {f: _first_int(docs, keys) for f, keys in _CONFIG_KEYS.items()}
    classes = config.get("architectures")
    dtype = _first(docs, ("dtype", "torch_dtype"))
    quantization = detect((), config)
    return ModelArchitecture(
        model_type=config.get("model_type") if isinstance(config.get("model_type"), str) else None,
        architecture=classes[0] if isinstance(classes, list) and classes and isinstance(classes[0], str) else None,
        tied_embeddings=_tied(docs),
        dtype=dtype if isinstance(dtype, str) else None,
        quantization=quantization.method if quantization else None,
        **numbers,
    )


def _first(docs: list[dict[str, Any]], keys: tuple[str, ...]) -> Any:
    return next((d[k] for d in docs for k in keys if d.get(k) is not None), None)


def _first_int(docs: list[dict[str, Any]], keys: tuple[str, ...]) -> int | None:
    value = _first(docs, keys)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _tied(docs: list[dict[str, Any]]) -> bool | None:
    """tie_word_embeddings, else the class's default; None when neither the key nor the model type is known."""
    if any("tie_word_embeddings" in d for d in docs) or docs[0].get("model_type"):
        return is_tied(docs[0])
    return None


def _gguf_report(path: Path) -> CheckpointReport:
    gguf, tensors, meta = read_gguf(path)
    return CheckpointReport(
        path=str(path),
        format="gguf",
        files=[path.name],
        tensors=len(tensors),
        parameters=sum(t.parameters for t in tensors),
        bytes=sum(t.nbytes for t in tensors),
        dtypes=_dtypes((t.dtype, t.parameters) for t in tensors),
        metadata=meta,
        adapter=None,
        form="adapter" if gguf.type == "adapter" else "model",
        architecture=_gguf_architecture(gguf) if gguf.type != "adapter" else None,
        gguf=gguf,
    )


def _gguf_architecture(gguf: GgufReport) -> ModelArchitecture:
    """A GGUF model's: general.architecture and its {arch}.block_count, embedding_length, ..."""
    n = gguf.model.get
    return ModelArchitecture(
        model_type=gguf.architecture,
        layers=n("layers"),
        hidden_size=n("hidden_size"),
        intermediate_size=n("intermediate_size"),
        attention_heads=n("attention_heads"),
        kv_heads=n("kv_heads"),
        vocab_size=n("vocab_size"),
    )


def _quantized(ckpt: Checkpoint) -> QuantizedWeights | None:
    try:
        layout = find_layout(ckpt, read_config(ckpt))
    except LorasurgeonError as exc:
        return QuantizedWeights([], 0, str(exc))
    return None if layout is None else QuantizedWeights(layout.methods, len(layout.tensors))


def _rel(path: Path, folder: Path) -> Path:
    try:
        return path.relative_to(folder)
    except ValueError:
        return path


_FORMS = {
    "model": "model",
    "adapter": "adapter ({format} format)",
    "augmented": "augmented: a model with LoRA layers inside (lorasurgeon convert {path} --to adapter|merged "
    "-o OUT gives the adapter or the merged model)",
}


def format_report(report: CheckpointReport) -> str:
    """A readable multi-line summary (the output of ``inspect`` without ``--json``)."""
    if report.gguf is not None:
        return "\n".join(_gguf_lines(report, report.gguf))
    held = report.adapter.format if report.adapter else "?"
    lines = [
        f"{report.path}",
        f"  format      {report.format}",
        f"  form        {_FORMS[report.form].format(path=report.path, format=held)}",
        *_architecture_lines(report.architecture),
        f"  files       {len(report.files)}: {', '.join(report.files[:4])}" + (" ..." if len(report.files) > 4 else ""),
        *_count_lines(report),
    ]
    if report.quantization is not None:
        q = report.quantized or QuantizedWeights([], 0)
        if q.unsupported:
            lines.append(f"  quantized   {report.quantization.describe()}: not readable: {q.unsupported}")
        else:
            lines.append(
                f"  quantized   {report.quantization.describe()}: {plural(q.weights, 'weight')} in "
                f"{', '.join(q.methods)}, "
                "read dequantized by every command (merge keeps the format unless --dtype)"
            )
    if report.adapter is not None:
        lines += adapter_lines(report.adapter)
    return "\n".join(lines)


def _count_lines(report: CheckpointReport) -> list[str]:
    return [
        f"  tensors     {report.tensors:,}",
        f"  parameters  {report.parameters:,}",
        f"  bytes       {report.bytes:,} ({report.bytes / 2**20:.1f} MiB)",
        "  dtypes      "
        + ", ".join(f"{k} ({plural(v.tensors, 'tensor')}, {v.parameters:,} params)" for k, v in report.dtypes.items()),
    ]


def _architecture_lines(arch: ModelArchitecture | None) -> list[str]:
    """model, shape and embeddings lines; what the config does not say is left out (a line with nothing, too)."""
    if arch is None:
        return []
    model = ", ".join(
        p
        for p in (
            f"{arch.model_type or '?'} ({arch.architecture})" if arch.architecture else arch.model_type,
            arch.dtype,
            f"quantized: {arch.quantization}" if arch.quantization else None,
        )
        if p
    )
    sizes = (
        (arch.layers, lambda n: plural(n, "layer")),
        (arch.hidden_size, lambda n: f"hidden {n}"),
        (arch.intermediate_size, lambda n: f"intermediate {n}"),
        (arch.attention_heads, lambda n: plural(n, "attention head")),
        (arch.kv_heads, lambda n: plural(n, "kv head")),
        (arch.vocab_size, lambda n: f"vocab {n:,}"),
    )
    shape = ", ".join(words(value) for value, words in sizes if value is not None)
    tied = None if arch.tied_embeddings is None else ("tied" if arch.tied_embeddings else "untied")
    return [
        f"  {label:<11} {text}" for label, text in (("model", model), ("shape", shape), ("embeddings", tied)) if text
    ]


def _gguf_lines(report: CheckpointReport, g: GgufReport) -> list[str]:
    if g.type == "adapter":
        form = f"llama.cpp adapter (adapter.type {g.adapter_type or '?'}"
        form += f", adapter.lora.alpha {g.lora_alpha:g})" if g.lora_alpha is not None else ")"
    else:
        form = g.type
    lines = [
        report.path,
        f"  format      GGUF v{g.version} ({g.file_bytes:,} bytes)",
        f"  form        {form}",
        f"  arch        {g.architecture or '?'}" + (f", {g.name!r}" if g.name else ""),
    ]
    if g.type != "adapter":
        lines += _architecture_lines(report.architecture)[1:]  # its model line would repeat the arch
    lines += _count_lines(report)
    if g.pairs or g.unpaired:
        ranks = ", ".join(f"r={r}: {n}" for r, n in g.ranks.items())
        lines.append(f"  lora pairs  {g.pairs} (.lora_a/.lora_b)" + (f"; ranks {ranks}" if ranks else ""))
    if g.unpaired:
        lines.append(f"  unpaired    {', '.join(g.unpaired)}")
    return lines
