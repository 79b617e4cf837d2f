"""ModelNames read off transformers itself: a model built on the meta device from the checkpoint's
own config.json (no memory, a fraction of a second), its weight conversions (``conversion_mapping``),
its tied weights and its output head. Nothing here is a copied table, so it follows the installed
transformers; what it cannot describe is reported, not guessed."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .model import FusedExperts, ModelNames
from .tables import task_type

if TYPE_CHECKING:
    from ..ops.lora import LayerName


def meta_model(config: Mapping[str, Any]) -> Any:
    """The checkpoint's model class, built on the meta device from its config (raises on failure)."""
    import torch
    import transformers

    model_type = config.get("model_type")
    if not model_type or model_type not in transformers.CONFIG_MAPPING:
        raise LookupError(f"transformers {transformers.__version__} does not know model_type {model_type!r}")
    cfg = transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))
    classes = [getattr(transformers, name) for name in config.get("architectures") or [] if hasattr(transformers, name)]
    with torch.device("meta"):
        if classes:
            return classes[0](cfg)
        return transformers.AutoModel.from_config(cfg)  # no class named: the headless model


def _fused(converter: Any, pattern: str, key: str) -> tuple[int, int] | None:
    """(part, expert) of a per-expert file key a converter fuses, if its operations are the ones
    described here: experts stacked on axis 0, parts concatenated on axis 1."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    parts = list(converter.source_patterns)
    if ops not in ([("MergeModulelist", 0), ("Concatenate", 1)], [("MergeModulelist", 0)]) or pattern not in parts:
        return None
    match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    return (parts.index(pattern), int(match.group(1))) if match else None


def from_transformers(file_keys: Sequence[str], config: Mapping[str, Any]) -> ModelNames | str:
    """The names of a checkpoint with these file keys and this config.json, or why transformers
    could not give them (a sentence)."""
    if not config.get("model_type"):  # not a transformers model (or no config.json): nothing to ask
        return "config.json names no model_type"
    try:
        import transformers
        from transformers import conversion_mapping
        from transformers.core_model_loading import (
            PrefixChange,
            WeightConverter,
            WeightRenaming,
            apply_renamings,
            rename_source_key,
        )
    except ImportError:
        return "transformers is not installed"
    try:
        model = meta_model(config)
    except Exception as exc:  # custom code, an unknown or broken config: say so, do not guess
        return f"transformers {transformers.__version__} cannot build it ({type(exc).__name__}: {exc})"
    transforms = conversion_mapping.get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    file_of: dict[str, str] = {}
    parts: dict[str, dict[tuple[int, int], str]] = {}
    for key in file_keys:
        memory, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if pattern is None:
            file_of[memory] = key
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        where = _fused(converter, pattern, key)
        if where is not None:
            parts.setdefault(memory, {})[where] = key
    fused = {}
    for memory, found in parts.items():
        n_parts, n_experts = max(p for p, _ in found) + 1, max(e for _, e in found) + 1
        if len(found) == n_parts * n_experts:
            fused[memory] = FusedExperts(tuple(tuple(found[(p, e)] for e in range(n_experts)) for p in range(n_parts)))
    # The names save_pretrained writes back: transformers' own revert_weight_conversion, for a model not
    # loaded from a file (no legacy renames such as LayerNorm.weight -> gamma, no prefix changes).
    forward = conversion_mapping.get_model_conversion_mapping(model, add_legacy=False)
    reversed_all = [t.reverse_transform() for t in forward[::-1] if not isinstance(t, PrefixChange)]
    reverse = [t for t in reversed_all if isinstance(t, WeightRenaming)]
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    head, embedding = _parameter(model, "get_output_embeddings"), _parameter(model, "get_input_embeddings")
    saved_as = {name: apply_renamings(name, reverse) for name in {*meta, *tied}}
    class_name = type(model).__name__
    stacked: dict[str, tuple[str, ...]] = {}
    transposed: set[str] = set()  # stacks stored (E, in, out): the module says is_transposed
    for name, module in model.named_modules():  # transformers 5's experts modules say how many they hold
        experts = getattr(module, "num_experts", None)
        own = module.named_parameters(recurse=False)
        params = tuple(f"{name}.{p}" for p, value in own if value.dim() == 3 and value.shape[0] == experts)
        if params and name:
            stacked[name] = params
            if getattr(module, "is_transposed", False):
                transposed.update(params)
    return ModelNames(
        file_of,
        tied,
        head,
        embedding,
        fused,
        class_name,
        task_type(class_name),
        f"transformers {transformers.__version__} ({class_name})",
        saved_as,
        frozenset(transposed),
        _layers(model),
        stacked,
        config["model_type"],
    )


def _layers(model: Any) -> dict[str, LayerName]:
    """Each module PEFT can put a LoRA layer on, by kind (its own isinstance tests, in this order)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds: tuple[tuple[type, LayerName], ...] = (
        (torch.nn.Embedding, "embedding"),
        (Conv1D, "conv1d"),
        (torch.nn.Linear, "linear"),
        (torch.nn.Conv2d, "conv"),
    )
    layers: dict[str, LayerName] = {}
    for name, module in model.named_modules():
        kind = next((k for cls, k in kinds if isinstance(module, cls)), None)
        if kind is not None and name:
            layers[name] = kind
    return layers


def _parameter(model: Any, getter: str) -> str | None:
    """The in-memory name of the ``weight`` of the module ``model.<getter>()`` returns (None when it has none)."""
    try:
        module = getattr(model, getter)()
    except (NotImplementedError, AttributeError):  # a model without embeddings (a ResNet) says so by raising
        return None
    if module is None or getattr(module, "weight", None) is None:
        return None
    return next((f"{name}.weight" for name, m in model.named_modules() if m is module), None)


def saved_keys(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> list[str] | None:
    """The file keys transformers' save_pretrained writes for in-memory tensors of these shapes (its own
    ``revert_weight_conversion``, run on meta tensors: fused experts come out per expert); None when
    transformers cannot say."""
    if not config.get("model_type"):
        return None
    try:
        import torch
        from transformers.core_model_loading import revert_weight_conversion

        model = meta_model(config)
        meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
        return list(revert_weight_conversion(model, meta))
    except Exception:  # not installed, custom code, a conversion that refuses these shapes: no answer
        return None
