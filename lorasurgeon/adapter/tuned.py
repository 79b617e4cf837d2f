"""An adapter of one of PEFT's tuners other than LoRA (LoHa, LoKr, IA³, OFT, VeRA, ...: ``ops.tuners.TUNERS``),
grouped from its saved keys: per module the tuner's parts (``base_model.model.<module>.<part>``) and the
adapter-wide tensors it uses (VeRA's ``base_model.vera_A``), and whole tensors (modules_to_save) as a LoRA
adapter's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterConfigError
from ..io.checkpoint import Checkpoint
from ..words import article
from .config import AdapterConfig
from .names import SAVED_PREFIX, strip_prefix


@dataclass(frozen=True)
class TunedModule:
    """One module a tuner adapts: its name in the base model, the tuner, and the adapter key of each part."""

    name: str
    tuner: str  # ops.tuners.TUNERS key: PEFT's peft_type, lowercased
    keys: dict[str, str]  # part (the tuner's module suffix, e.g. "hada_w1_a") -> key in the adapter file

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.name}.bias"


def group_tuned(
    folder: Path, config: AdapterConfig, ckpt: Checkpoint, tuner: str
) -> tuple[dict[str, TunedModule], dict[str, str]]:
    """(modules, whole tensors by base name) of a tuner's adapter: each module's parts by the tuner's own key rule
    (``Tuner.split_key``), with the adapter-wide tensors it uses (``Tuner.shared_parts``: VeRA's projections,
    FRoD's per-role ones) among them. A targeted embedding's W0, which PEFT saves beside its parts
    (``base_layer.weight``), is the base's own tensor and left out."""
    from ..ops.tuners import TUNERS

    spec = TUNERS[tuner]
    parts: dict[str, dict[str, str]] = {}
    others: list[str] = []
    for key in ckpt:
        name = strip_prefix(key)
        split = spec.split_key(name) if key.startswith(SAVED_PREFIX) else None
        if split is not None:
            parts.setdefault(split[0], {})[split[1]] = key
        elif not name.endswith(".base_layer.weight"):
            others.append(key)
    if not parts:
        raise AdapterConfigError(
            f"{folder}: {article(config.peft_type)} adapter with none of its tensors "
            f"({', '.join(spec.module_suffixes)})"
        )
    modules: dict[str, TunedModule] = {}
    shared: set[str] = set()
    for module, keys in parts.items():
        found = {part: key for part, key in spec.shared_parts(module).items() if key in ckpt}
        shared.update(found.values())
        modules[module] = TunedModule(module, tuner, {**keys, **found})
    whole = {strip_prefix(k).replace(".base_layer.", "."): k for k in others if k not in shared}
    return modules, {k: v for k, v in whole.items() if v.startswith(SAVED_PREFIX)}
