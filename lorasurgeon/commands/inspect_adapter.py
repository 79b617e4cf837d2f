"""What ``inspect`` says of an adapter: its config, features and modules (AdapterReport), and its lines; a
format read against its base (kohya's, diffusers') under the file's own names, with its family and parts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..adapter.config import AdapterConfig
from ..adapter.formats.pipeline_names import family_of, touched
from ..adapter.formats.registry import Probe, claiming
from ..adapter.weights import LoraAdapter, LoraModule
from ..io.checkpoint import Checkpoint
from ..words import plural


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
    format: str = "peft"  # the adapter format it is in (adapter.formats.registry)
    tuner: str | None = None  # PEFT's tuner other than LoRA (ops.tuners) whose modules it holds; r, alpha are LoRA's
    family: str | None = None  # a diffusion LoRA's model family, as its module names say (SDXL, Flux.1)
    touches: dict[str, int] | None = None  # a diffusion LoRA's modules per component (unet, lora_te1)


def read_as_named(ckpt: Checkpoint) -> LoraAdapter | None:
    """The adapter of a format read against its base (kohya's, diffusers'), under the file's own names."""
    found = claiming(Probe.of(ckpt))
    if found is None or found.read_as_named is None:
        return None
    return replace(found.read_as_named(ckpt.root), format=found.name)


def adapter_report(adapter: LoraAdapter) -> AdapterReport:
    cfg = adapter.config
    kinds = {m.kind for m in adapter.modules.values()}
    features = cfg.features() + sorted(k for k in kinds if k != "linear")
    if adapter.tuner is not None:  # a tuner other than LoRA: its parts per module, no rank or scale of LoRA's
        features = [f"{adapter.tuner} (merged as PEFT merges it; `convert --to lora` gives its best LoRA)"]
    if adapter.base_weights:
        features.append("base_layer_weights")
    target = cfg.target_modules
    diffusion = adapter.format in ("kohya", "diffusers")
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
        modules=[_module_report(m, cfg, set(adapter.modules)) for m in adapter.modules.values()]
        + [ModuleReport(m.name, m.tuner, 0, None, None) for m in adapter.tuned.values()],
        target_parameters=list(cfg.target_parameters),
        format=adapter.format,
        tuner=adapter.tuner,
        family=family_of([*adapter.modules, *adapter.tuned]) if diffusion else None,
        touches=touched([*adapter.modules, *adapter.tuned]) if diffusion else None,
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


def _touches(counts: dict[str, int]) -> str:
    return ", ".join(f"{part} ({plural(n, 'module')})" for part, n in counts.items())


def adapter_lines(a: AdapterReport) -> list[str]:
    """The adapter's lines of ``inspect``'s text."""
    lines: list[str] = []
    target = a.target_modules if isinstance(a.target_modules, str) else ", ".join(a.target_modules or [])
    lines += [
        f"  adapter     {a.peft_type}, "
        + ("" if a.tuner else f"r={a.r}, lora_alpha={a.lora_alpha:g}, ")
        + (f"for {a.family}" if a.family else f"base={a.base_model or '?'}"),
        f"  targets     {target}" + (f"; parameters {', '.join(a.target_parameters)}" if a.target_parameters else "")
        if a.touches is None
        else f"  touches     {_touches(a.touches)}",
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
            if m.kind not in ("linear", "embedding", "conv", "experts"):  # a tuner's module: no LoRA rank
                lines.append(f"  {m.name.ljust(width)}  {m.kind:<9}")
            elif m.alpha is None or m.scale is None:  # stacked experts: E·r rows, E known from the base
                lines.append(f"  {m.name.ljust(width)}  {m.kind:<9} {m.rank:>4} {'(E·r)':>16}")
            else:
                lines.append(f"  {m.name.ljust(width)}  {m.kind:<9} {m.rank:>4} {m.alpha:>7g} {m.scale:>8.4g}")
    return lines
