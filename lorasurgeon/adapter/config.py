"""AdapterConfig: adapter_config.json, parsed, with PEFT's rules for per-module rank, alpha and scale."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

from ..errors import AdapterConfigError, InputNotFoundError, LorasurgeonWarning
from ..io.sidecar import read_json_object

CONFIG_NAME = "adapter_config.json"

# The fields of PEFT's LoraConfig (and PeftConfig), as of PEFT 0.21.2: PEFT warns about any other key and
# ignores it (PeftConfig.from_peft_type: "Unexpected keyword arguments"), and so does lorasurgeon.
KNOWN_KEYS = frozenset(
    """alora_invocation_tokens alpha_pattern arrow_config auto_mapping base_model_name_or_path bias corda_config
    ensure_weight_tying eva_config exclude_modules fan_in_fan_out inference_mode init_lora_weights kasa_config
    layer_replication layers_pattern layers_to_transform loftq_config lora_alpha lora_bias lora_dropout lora_ga_config
    megatron_config megatron_core modules_to_save monteclora_config peft_type peft_version qalora_group_size r
    rank_pattern revision runtime_config target_modules target_parameters task_type trainable_token_indices use_bdlora
    use_dora use_qalora use_rslora velora_config""".split()
) | {"lora_B_layout", "unsloth_fused_expert_lora"}  # Unsloth's record of its stacked-experts packing (expert_layouts)
# LoraConfig.bias: which biases PEFT trains (and saves in full) beside the LoRA factors.
Bias = Literal["none", "all", "lora_only"]
# What PEFT's LoraConfig takes when the file does not say (its dataclass defaults).
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}


class AdapterConfigWarning(LorasurgeonWarning):
    """adapter_config.json is read as PEFT reads it, but PEFT would warn, or fill in a default silently."""


def peft_warnings(raw: Mapping[str, Any]) -> list[str]:
    """What a reader of this LoRA config should be told: the keys PEFT ignores, the defaults it fills in."""
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        return []  # another PEFT type: its keys and defaults are its own, and it is refused as that type
    unknown = [
        f"unexpected key {key!r}, ignored (as PEFT ignores it: a newer PEFT's, or a typo?)"
        for key in sorted(raw)
        if key not in KNOWN_KEYS
    ]
    defaulted = [
        f"no {key}: PEFT's default {key}={value} is used" for key, value in PEFT_DEFAULTS.items() if key not in raw
    ]
    return unknown + defaulted


# Variants whose weights are not "W0 + s·B·A" on an unchanged base: refused by name. (EVA, Gaussian,
# orthogonal and LoRA-GA inits only choose the first A and B: the saved adapter is a plain LoRA.)
UNSUPPORTED_INITS = ("pissa", "olora", "corda", "loftq")
UNSUPPORTED_KEYS = {
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "kasa_config": "KaSA (kasa_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "layer_replication": "layer replication (layer_replication: the adapted model has more layers than the base)",
}


def _or_default(raw: Mapping[str, Any], key: str) -> Any:
    """``raw[key]``, or PEFT's default where it is missing or null (another tuner's config may hold a null)."""
    value = raw.get(key)
    return PEFT_DEFAULTS[key] if value is None else value


def _tuners() -> str:
    from ..ops.tuners import TUNERS

    return ", ".join(["LORA", *(t.upper() for t in TUNERS)])


def _converted(init: str) -> str:
    """How to make a plain LoRA of an adapter whose init changed the base, where one can be made."""
    if init.lower().startswith("loftq"):
        return ""
    return (
        ": make it the plain LoRA of the unchanged base with `lorasurgeon convert ADAPTER --initial INITIAL -o LORA`, "
        "INITIAL the adapter PEFT saved before training"
    )


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` (file order) matching ``module`` as PEFT's ``get_pattern_key`` does."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _as_tuple(value: tuple[str, ...] | str | None) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else (value or ())


def _bias(value: Any) -> Bias:
    """LoraConfig.bias, one of PEFT's values (PEFT refuses any other when it loads the adapter)."""
    if isinstance(value, str) and value in get_args(Bias):
        return cast(Bias, value)
    raise ValueError(f"bias must be one of {', '.join(get_args(Bias))}, got {value!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT LoRA config that decide what its tensors mean."""

    raw: Mapping[str, Any] = field(repr=False)
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    target_modules: tuple[str, ...] | str | None
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    layers_to_transform: tuple[int, ...] | None
    modules_to_save: tuple[str, ...]
    bias: Bias
    lora_bias: bool
    trainable_token_indices: Mapping[str, tuple[int, ...]] | None
    base_model: str | None
    target_parameters: tuple[str, ...] = ()  # parameters wrapped by PEFT's ParamWrapper (MoE experts)

    @classmethod
    def load(cls, folder: str | Path) -> AdapterConfig:
        """Read ``adapter_config.json`` from an adapter folder (or the file itself); an AdapterConfigWarning for
        each key PEFT would ignore and each default it would fill in (``peft_warnings``)."""
        path = Path(folder)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise InputNotFoundError(f"{path}: not found; a PEFT adapter folder needs {CONFIG_NAME}")
        raw = read_json_object(path, AdapterConfigError)
        try:
            config = cls.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise AdapterConfigError(f"{path}: {exc}") from None
        for warning in peft_warnings(raw):
            warnings.warn(f"{path}: {warning}", AdapterConfigWarning, stacklevel=2)
        return config

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> AdapterConfig:
        """Build from a config mapping; raises ValueError/TypeError on fields of the wrong type."""

        def names(value: Any, key: str) -> tuple[str, ...] | str | None:
            if value is None or isinstance(value, str):
                return value
            if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise TypeError(f"{key} must be a string or a list of strings")

        tti = raw.get("trainable_token_indices")
        if isinstance(tti, list):
            tti = {"embed_tokens": tti}
        if tti is not None:
            tti = {str(k): tuple(int(i) for i in v) for k, v in dict(tti).items()}
        layers = raw.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        r = raw.get("r", PEFT_DEFAULTS["r"])
        lora = str(raw.get("peft_type", "LORA")).upper() == "LORA"  # another tuner's r is its own (OFT's may be 0)
        if not lora and (r is None or isinstance(r, bool) or not isinstance(r, int)):
            r = 0  # its math reads its own fields (ops.tuners); r is LoRA's
        if not isinstance(r, int) or isinstance(r, bool) or (r <= 0 and lora) or r < 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in dict(raw.get(field_name) or {}):
                try:
                    re.compile(rf"(.*\.)?({key})$")
                except (re.error, TypeError) as exc:
                    raise ValueError(f"{field_name} key {key!r} is not a valid regex ({exc})") from None
        if isinstance(raw.get("target_modules"), str):
            try:
                re.compile(raw["target_modules"])
            except re.error as exc:
                raise ValueError(f"target_modules {raw['target_modules']!r} is not a valid regex ({exc})") from None
        return cls(
            raw=dict(raw),
            peft_type=str(raw.get("peft_type", "LORA")),
            r=r,
            lora_alpha=float(_or_default(raw, "lora_alpha")),
            use_rslora=bool(raw.get("use_rslora", False)),
            use_dora=bool(raw.get("use_dora", False)),
            target_modules=names(raw.get("target_modules"), "target_modules"),
            rank_pattern={str(k): int(v) for k, v in dict(raw.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in dict(raw.get("alpha_pattern") or {}).items()},
            layers_to_transform=tuple(int(i) for i in layers) if layers else None,
            modules_to_save=_as_tuple(names(raw.get("modules_to_save"), "modules_to_save")),
            bias=_bias(raw.get("bias", "none")),
            lora_bias=bool(raw.get("lora_bias", False)),
            trainable_token_indices=tti,
            base_model=raw.get("base_model_name_or_path"),
            target_parameters=_as_tuple(names(raw.get("target_parameters"), "target_parameters")),
        )

    @property
    def folded_tuner(self) -> bool:
        """A tuner other than LoRA whose math ``ops.tuners`` holds (LoHa, LoKr, IA³, OFT, VeRA, ...)."""
        return self.tuner is not None

    @property
    def tuner(self) -> str | None:
        """The ``ops.tuners`` key of a tuner other than LoRA whose math lorasurgeon holds (None for LoRA, or for
        a peft_type it has none for: refused by ``unsupported``)."""
        if self.peft_type.upper() == "LORA":
            return None
        from ..ops.tuners import TUNERS  # torch-free at import; asked only for another tuner's adapter

        name = self.peft_type.lower()
        return name if name in TUNERS else None

    @property
    def peft_version(self) -> tuple[int, int, int] | None:
        """The PEFT version that wrote the adapter (``peft_version``, e.g. "0.21.2"), if it says."""
        match = re.match(r"(\d+)\.(\d+)\.(\d+)", str(self.raw.get("peft_version") or ""))
        return (int(match[1]), int(match[2]), int(match[3])) if match else None

    def token_indices(self, module: str) -> tuple[int, ...] | None:
        """The token ids of trainable tokens for ``module`` (keys match as module-name suffixes)."""
        for key, ids in (self.trainable_token_indices or {}).items():
            if module == key or module.endswith("." + key):
                return ids
        return None

    def alpha_for(self, module: str) -> float:
        """lora_alpha for a module: the first matching ``alpha_pattern`` key (file order), else the default."""
        key = pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scale(self, module: str, rank: int) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA; ``rank`` from the tensors."""
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def unsupported(self) -> list[str]:
        """Names of the variants this config uses that are not plain LoRA (empty when it is)."""
        found = []
        if self.peft_type.upper() != "LORA" and not self.folded_tuner:
            found.append(f"peft_type {self.peft_type} (PEFT's tuners lorasurgeon folds: {_tuners()})")
        init = self.raw.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(UNSUPPORTED_INITS):
            found.append(f"init_lora_weights={init!r} (the base was changed when training started){_converted(init)}")
        for key, label in UNSUPPORTED_KEYS.items():
            if self.raw.get(key):
                found.append(label)
        return found

    def features(self) -> list[str]:
        """Which LoRA features the config turns on, for reports."""
        flags = {
            "dora": self.use_dora,
            "rslora": self.use_rslora,
            "rank_pattern": bool(self.rank_pattern),
            "alpha_pattern": bool(self.alpha_pattern),
            "modules_to_save": bool(self.modules_to_save),
            "bias": self.bias != "none",
            "lora_bias": self.lora_bias,
            "trainable_tokens": bool(self.trainable_token_indices),
            "layers_to_transform": bool(self.layers_to_transform),
            "target_parameters": bool(self.target_parameters),
        }
        return [name for name, on in flags.items() if on]
