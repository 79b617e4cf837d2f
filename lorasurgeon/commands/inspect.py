"""Describe a checkpoint or adapter from its headers: the ``inspect`` command."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..adapter.config import CONFIG_NAME, AdapterConfig
from ..adapter.weights import LoraAdapter, LoraModule, load_adapter
from ..errors import LorasurgeonError
from ..formats.detect import Quantization, detect
from ..formats.layout import find_layout
from ..hub.source import resolve
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.sidecar import read_config
from ._inputs import input_kind


@dataclass(frozen=True)
class DtypeCount:
    tensors: int
    parameters: int


@dataclass(frozen=True)
class ModuleReport:
    name: str
    kind: str  # linear | embedding | conv | experts (a stacked MoE parameter: rank is E·r, alpha and
    # scale follow from the base's expert count, so they are None here)
    rank: int
    alpha: float | None
    scale: float | None


@dataclass(frozen=True)
class AdapterReport:
    peft_type: str
    base_model: str | None
    r: int
    lora_alpha: float
    target_modules: list[str] | str | None
    features: list[str]
    unsupported: list[str]
    modules_to_save: list[str]
    replaced_tensors: list[str]
    modules: list[ModuleReport]
    target_parameters: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class QuantizedWeights:
    """The quantized weights of a checkpoint as lorasurgeon reads them (dequantized), or why it cannot."""

    methods: list[str]  # the formats, e.g. ["block FP8"]
    weights: int  # quantized weights found
    unsupported: str | None = None  # the refusal, for a format or layout it does not read


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

    def to_dict(self) -> dict:
        return asdict(self)


def inspect(path: str | os.PathLike[str]) -> CheckpointReport:
    """Describe a model, PEFT adapter or augmented checkpoint from its headers (no tensor data is read).

    Args:
        path: a folder, a single .safetensors/.bin file, or a Hub repo id ``org/name[@revision]``.

    Returns:
        A CheckpointReport: format, files, tensor and parameter counts by dtype, its form (model,
        adapter, augmented), the adapter's modules with rank/alpha/scale, and any quantization.
        Its ``to_dict()`` is ``inspect --json``.

    Raises:
        InputNotFoundError: no such local path, or no such Hub repo or revision.
        CorruptCheckpointError, UnsafeCheckpointError: a file that cannot be read safely.
        AdapterConfigError: an adapter whose adapter_config.json is invalid.
    """
    root = resolve(path)
    ckpt = open_checkpoint(root)
    form = input_kind(ckpt)
    has_config = ckpt.folder.joinpath(CONFIG_NAME).is_file()
    adapter = None
    if form == "adapter" and has_config:
        ckpt.close()
        adapter = load_adapter(ckpt.folder)
        ckpt = adapter.checkpoint
    elif form == "augmented" and has_config:  # the adapter inside, read as convert reads it
        from .merge.augmented import split_augmented  # the merge package only for this kind of checkpoint

        _, adapter, _ = split_augmented(ckpt, AdapterConfig.load(ckpt.folder), read_config(ckpt.folder))
    dtypes: dict[str, list[int]] = {}
    for info in ckpt.infos():
        counts = dtypes.setdefault(info.dtype_name, [0, 0])
        counts[0] += 1
        counts[1] += info.numel
    files = [ckpt.index_file] if ckpt.index_file else []
    files += list(ckpt.files)
    report = CheckpointReport(
        path=str(root),
        format=ckpt.format,
        files=[str(_rel(f, ckpt.folder)) for f in files],
        tensors=len(ckpt),
        parameters=sum(i.numel for i in ckpt.infos()),
        bytes=ckpt.nbytes,
        dtypes={k: DtypeCount(*v) for k, v in sorted(dtypes.items())},
        metadata=dict(ckpt.metadata),
        adapter=_adapter_report(adapter) if adapter else None,
        quantization=detect(((i.name, i.dtype_name) for i in ckpt.infos()), read_config(ckpt.folder)),
        form=form,
        quantized=_quantized(ckpt),
    )
    ckpt.close()
    return report


def _quantized(ckpt: Checkpoint) -> QuantizedWeights | None:
    try:
        layout = find_layout(ckpt, read_config(ckpt.folder))
    except LorasurgeonError as exc:
        return QuantizedWeights([], 0, str(exc))
    return None if layout is None else QuantizedWeights(layout.methods, len(layout.tensors))


def _rel(path: Path, folder: Path) -> Path:
    try:
        return path.relative_to(folder)
    except ValueError:
        return path


def _adapter_report(adapter: LoraAdapter) -> AdapterReport:
    cfg = adapter.config
    kinds = {m.kind for m in adapter.modules.values()}
    features = cfg.features() + sorted(k for k in kinds if k != "linear")
    if adapter.base_weights:
        features.append("base_layer_weights")
    target = cfg.target_modules
    return AdapterReport(
        peft_type=cfg.peft_type,
        base_model=cfg.base_model,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        target_modules=sorted(target) if isinstance(target, tuple) else target,
        features=features,
        unsupported=cfg.unsupported(),
        modules_to_save=list(cfg.modules_to_save),
        replaced_tensors=sorted(adapter.replacements),
        modules=[_module_report(m, cfg, set(adapter.modules)) for m in adapter.modules.values()],
        target_parameters=list(cfg.target_parameters),
    )


def _module_report(module: LoraModule, cfg: AdapterConfig, modules: set[str]) -> ModuleReport:
    """A module's line; a ParamWrapper on stacked experts has rank E·r, and E is the base's. Told from the
    adapter alone: wrappers nest (``experts.base_layer``), the module is named in a dotted target
    parameter (``experts.gate_up_proj``), or is transformers' ``experts``."""
    owners = {
        t.rpartition(".")[0].rpartition(".")[2]
        for t in cfg.target_parameters
        if "." in t and t.rpartition(".")[2] not in ("weight", "bias")
    }
    leaf = module.name.replace(".base_layer", "").rpartition(".")[2]
    nested = ".base_layer" in module.name or f"{module.name}.base_layer" in modules
    if cfg.target_parameters and (nested or leaf in owners or leaf == "experts"):
        return ModuleReport(module.name, "experts", module.rank, None, None)
    return ModuleReport(module.name, module.kind, module.rank, module.alpha, module.scale)


_FORMS = {
    "model": "model",
    "adapter": "PEFT adapter",
    "augmented": "augmented: a model with LoRA layers inside (lorasurgeon convert {path} --to adapter|merged "
    "-o OUT gives the adapter or the merged model)",
}


def format_report(report: CheckpointReport) -> str:
    """A readable multi-line summary (the output of ``inspect`` without ``--json``)."""
    lines = [
        f"{report.path}",
        f"  format      {report.format}",
        f"  form        {_FORMS[report.form].format(path=report.path)}",
        f"  files       {len(report.files)}: {', '.join(report.files[:4])}" + (" ..." if len(report.files) > 4 else ""),
        f"  tensors     {report.tensors:,}",
        f"  parameters  {report.parameters:,}",
        f"  bytes       {report.bytes:,} ({report.bytes / 2**20:.1f} MiB)",
        "  dtypes      "
        + ", ".join(f"{k} ({v.tensors} tensors, {v.parameters:,} params)" for k, v in report.dtypes.items()),
    ]
    if report.quantization is not None:
        q = report.quantized or QuantizedWeights([], 0)
        if q.unsupported:
            lines.append(f"  quantized   {report.quantization.describe()}: not readable: {q.unsupported}")
        else:
            lines.append(
                f"  quantized   {report.quantization.describe()}: {q.weights} weights in {', '.join(q.methods)}, "
                "read dequantized by every command (merge keeps the format unless --dtype)"
            )
    a = report.adapter
    if a is None:
        return "\n".join(lines)
    target = a.target_modules if isinstance(a.target_modules, str) else ", ".join(a.target_modules or [])
    lines += [
        f"  adapter     {a.peft_type}, r={a.r}, lora_alpha={a.lora_alpha:g}, base={a.base_model or '?'}",
        f"  targets     {target}" + (f"; parameters {', '.join(a.target_parameters)}" if a.target_parameters else ""),
        f"  features    {', '.join(a.features) or 'plain LoRA'}",
    ]
    if a.unsupported:
        lines.append(f"  unsupported {'; '.join(a.unsupported)}")
    if a.replaced_tensors:
        lines.append(f"  replaces    {', '.join(a.replaced_tensors)}")
    if a.modules:
        width = max(len(m.name) for m in a.modules)
        lines.append(f"  {'module'.ljust(width)}  {'kind':<9} {'rank':>4} {'alpha':>7} {'scale':>8}")
        for m in a.modules:
            if m.alpha is None or m.scale is None:  # stacked experts: E·r rows, E known from the base
                lines.append(f"  {m.name.ljust(width)}  {m.kind:<9} {m.rank:>4} {'(E·r)':>16}")
            else:
                lines.append(f"  {m.name.ljust(width)}  {m.kind:<9} {m.rank:>4} {m.alpha:>7g} {m.scale:>8.4g}")
    return "\n".join(lines)
