"""Planning a merge or unmerge: which base tensors change, by which LoRA terms, checked from headers.

The result is a list of TensorOps (see ``ops.py``) for the merged form; ``augmented.py`` renames
them for the augmented form. Nothing here reads tensor data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from ...adapter.names import CONV1D_MODEL_TYPES
from ...adapter.weights import LoraAdapter, LoraModule
from ...engine.plan import Ref
from ...errors import AdapterConfigError, IncompatibleError, UnsupportedError
from ...io.checkpoint import Checkpoint
from ...io.dtypes import is_floating, torch_name
from ...names import ModelNames
from ...ops.lora import CONV1D, LAYER_KINDS, LINEAR, LayerKind
from .._inputs import FLOAT32_MAX
from .experts import expert_terms
from .ops import Action, BiasTerm, LoraTerm, RowPatch, TensorOp, Term

if TYPE_CHECKING:
    pass
else:
    pass


def module_kind(
    module: LoraModule, weight_shape: tuple[int, ...], model_type: str | None, adapter: LoraAdapter
) -> LayerKind:
    """Linear, Conv1D, Embedding or Conv, checked against the base weight's shape."""
    a_role, b_role = LAYER_KINDS[module.kind].lora_roles
    a = adapter.checkpoint.info(module.keys[a_role]).shape
    b = adapter.checkpoint.info(module.keys[b_role]).shape
    candidates = [LAYER_KINDS[module.kind]]
    if module.kind == "linear":  # a Linear or GPT-2's Conv1D: the base weight's shape tells them apart
        square = LINEAR.delta_shape(a, b) == CONV1D.delta_shape(a, b)
        conv1d_first = square and (model_type in CONV1D_MODEL_TYPES or bool(adapter.config.raw.get("fan_in_fan_out")))
        candidates = [CONV1D, LINEAR] if conv1d_first else [LINEAR, CONV1D]
    for role in ("emb_A", "emb_B", "A", "B", "magnitude", "B_bias"):
        if role in module.keys and not is_floating(adapter.checkpoint.info(module.keys[role]).dtype_name):
            raise IncompatibleError(
                f"{adapter.path}: module {module.name!r}: {module.keys[role]} is not a float tensor"
            )
    for kind in candidates:
        if kind.delta_shape(a, b) == tuple(weight_shape):
            return kind
    raise IncompatibleError(
        f"{adapter.path}: module {module.name!r}: lora_A {list(a)} / lora_B {list(b)} do not fit "
        f"the base weight {list(weight_shape)} (is this adapter for another model?)"
    )


def check_supported(adapter: LoraAdapter, *, unmerge: bool, weight: float) -> None:
    """Refuse, by name, what cannot be merged (or unmerged) as plain LoRA."""
    found = adapter.config.unsupported()
    if adapter.config.raw.get("ensure_weight_tying"):
        found.append("ensure_weight_tying (adapters tied between embedding and lm_head)")
    if found:
        raise UnsupportedError(f"{adapter.path}: not plain LoRA, cannot be merged: {'; '.join(found)}")
    has_dora = any("magnitude" in m.keys for m in adapter.modules.values())
    if has_dora and unmerge:
        raise UnsupportedError(
            f"{adapter.path}: DoRA cannot be unmerged from the merged weights alone: every merged row "
            "has norm |m|, so the norm of W0 + ΔW that DoRA divided by is lost; keep the base model"
        )
    if has_dora and weight != 1.0:
        raise UnsupportedError(f"{adapter.path}: a DoRA adapter cannot be merged with a weight other than 1")
    if unmerge:
        lost = [
            what
            for what, on in (
                ("modules_to_save / full trained tensors", bool(adapter.replacements)),
                ("trainable tokens", bool(adapter.token_deltas)),
            )
            if on
        ]
        if lost:
            raise UnsupportedError(
                f"{adapter.path}: cannot unmerge: the adapter replaced tensors outright "
                f"({', '.join(lost)}), so the originals are not in the merged model"
            )


def plan_merge(
    base: Checkpoint,
    adapters: list[LoraAdapter],
    weights: list[float],
    names: ModelNames,
    model_type: str | None,
    *,
    dtype: str | None,
    unmerge: bool = False,
) -> tuple[list[TensorOp], bool]:
    """One op per output tensor, in base order, and whether a tied tensor had to be untied (and added).

    Ops are keyed by the files' own names; an adapter names tensors as they are in memory (under
    transformers 5, renamed), or as the files name them (as under transformers 4): both resolve.
    A tied tensor the files omit (a tied head) is a view of its source with its own ops.
    """
    sign = -1.0 if unmerge else 1.0
    terms: dict[str, list[Term]] = {}
    srcs: dict[str, Ref] = {}
    rows: dict[str, list[RowPatch]] = {}
    replaced: dict[str, Ref] = {}
    views = names.tied_absent(set(base))  # in-memory tied tensors the files omit -> their in-memory source

    def plan_key(name: str) -> str | None:
        """An adapter's tensor name -> the file key it is, or the tied view it names."""
        file = names.file_key(name)
        if file is not None and file in base:
            return file
        if name in base:
            return name
        return name if name in views else None

    def target(name: str, adapter: LoraAdapter, what: str) -> str:
        key = plan_key(name)
        if key is None:
            raise IncompatibleError(
                f"{adapter.path}: {what} targets {name!r}, which the base model does not have "
                "(is this adapter for another model?)"
            )
        return key

    def same_shape(name: str, adapter: LoraAdapter, key: str, what: str) -> None:
        want, got = shape_of(name, adapter), adapter.checkpoint.info(key).shape
        if got != want:
            raise IncompatibleError(
                f"{adapter.path}: {what} {key!r} is {list(got)}, the base's {name!r} is {list(want)} "
                "(is this adapter for another model, or for a resized vocabulary?)"
            )

    def base_key(key: str) -> str:
        """The file tensor behind a plan key: itself, or a tied view's source."""
        if key in base:
            return key
        source = names.file_key(views[key])
        assert source is not None  # tied_absent keeps only views whose source the files hold
        return source

    def tied_to(key: str) -> list[str]:
        """Plan keys of the tensors the model ties to file tensor ``key``: views the files omit, and ones they
        hold (T5's lm_head, whose config ties it whatever the files say: PEFT follows the config)."""
        source = names.memory_name(key)
        return [plan_key(t) or t for t, s in names.tied.items() if s == source and (plan_key(t) or t) != key]

    def shape_of(name: str, adapter: LoraAdapter) -> tuple[int, ...]:
        info = base.info(base_key(name))
        if not is_floating(info.dtype_name):
            raise IncompatibleError(
                f"{adapter.path}: targets {name!r}, a {torch_name(info.dtype_name)} tensor in the base: only float "
                "weights can be merged"
            )
        return info.shape

    def check_scale(adapter: LoraAdapter, module: LoraModule, w: float, scale: float) -> float:
        signed = sign * w * scale
        if not math.isfinite(signed) or abs(signed) > FLOAT32_MAX:
            raise AdapterConfigError(
                f"{adapter.path}: module {module.name!r}: its scale (weight {w:g} x alpha/r {scale:g}) "
                "does not fit float32 arithmetic; check lora_alpha and the weight"
            )
        return signed

    for i, (adapter, w) in enumerate(zip(adapters, weights, strict=True), start=1):
        stacked: dict[str, str] = {}  # stacked parameter -> the wrapper adapting it
        for module in adapter.modules.values():
            if adapter.config.target_parameters and module.kind == "linear" and plan_key(module.weight_name) is None:
                parameter, scale, shares = expert_terms(module, adapter, names, base)  # a stacked MoE parameter
                if parameter in stacked:
                    raise IncompatibleError(
                        f"{adapter.path}: modules {stacked[parameter]!r} and {module.name!r} both adapt {parameter!r}"
                    )
                stacked[parameter] = module.name
                a, b = Ref(i, module.keys["A"]), Ref(i, module.keys["B"])
                for key, kind in shares:
                    terms.setdefault(key, []).append(LoraTerm(kind, a, b, check_scale(adapter, module, w, scale)))
                continue
            wname = target(module.weight_name, adapter, f"module {module.name!r}")
            kind = module_kind(module, shape_of(wname, adapter), model_type, adapter)
            a_role, b_role = kind.lora_roles
            a, b = Ref(i, module.keys[a_role]), Ref(i, module.keys[b_role])
            mag = Ref(i, module.keys["magnitude"]) if "magnitude" in module.keys else None
            if mag is not None:
                shape, numel = shape_of(wname, adapter), adapter.checkpoint.info(mag.key).numel
                units = shape[1] if kind.transposed else shape[0]
                if numel != units:
                    raise IncompatibleError(
                        f"{adapter.path}: DoRA magnitude {mag.key!r} has {numel} values, "
                        f"{wname!r} has {units} output units"
                    )
            scale = check_scale(adapter, module, w, module.scale)
            terms.setdefault(wname, []).append(LoraTerm(kind, a, b, scale, mag))
            if "B_bias" in module.keys:
                bname = target(module.bias_name, adapter, f"lora_bias of {module.name!r}")
                terms.setdefault(bname, []).append(BiasTerm(Ref(i, module.keys["B_bias"]), scale))
        for name, key in adapter.base_weights.items():  # W0 itself: merge adds to it, unmerge restores it
            planned = target(name, adapter, "a saved base_layer weight")
            srcs[planned] = Ref(i, key)
            same_shape(planned, adapter, key, "the saved base_layer weight")
        for name, key in adapter.replacements.items():
            planned = target(name, adapter, "a full trained tensor")
            replaced[planned] = Ref(i, key)
            same_shape(planned, adapter, key, "the full trained tensor")
        for token_module, key in adapter.token_deltas.items():
            indices = adapter.config.token_indices(token_module)
            assert indices is not None  # load_adapter refuses token deltas the config does not name
            wname = target(f"{token_module}.weight", adapter, "trainable tokens")
            rows_, dim = shape_of(wname, adapter)[:2]
            if adapter.checkpoint.info(key).shape != (len(indices), dim) or not all(0 <= t < rows_ for t in indices):
                raise IncompatibleError(
                    f"{adapter.path}: trainable tokens {key!r} {list(adapter.checkpoint.info(key).shape)} do not fit "
                    f"token ids {list(indices)[:5]}... of {wname!r} {[rows_, dim]}"
                )
            patch = RowPatch(indices, Ref(i, key))
            rows.setdefault(wname, []).append(patch)
            for tied_key in tied_to(wname):  # PEFT wraps every module tied to the embedding with its tokens
                rows.setdefault(tied_key, []).append(patch)

    for view in views:  # a saved W0 of any tied module is loaded by PEFT into the one shared tensor
        shared = srcs.get(base_key(view)) or srcs.get(view)
        if shared is not None:
            srcs[base_key(view)] = srcs[view] = shared

    def op_for(name: str, src_name: str) -> TensorOp:
        info = base.info(src_name)
        out_dtype = dtype if (dtype is not None and is_floating(info.dtype_name)) else info.dtype_name
        saved = srcs.get(name) if name not in replaced else None
        # A saved W0 is taken at the base's dtype, as the adapter model holds it.
        src_dtype = None
        if saved is not None and adapters[saved.source - 1].checkpoint.info(saved.key).dtype_name != info.dtype_name:
            src_dtype = info.dtype_name
        if unmerge and saved is not None:  # the adapter holds W0 itself: write it back, exactly
            return TensorOp(name, saved, out_dtype, info.shape, "restore", src_dtype_name=src_dtype)
        src = replaced.get(name) or saved or Ref(0, src_name)
        t, r = tuple(terms.get(name, ())), tuple(rows.get(name, ()))
        changed: Action = "unmerge" if unmerge else "merge"
        action: Action = changed if (t or r) else ("replace" if name in replaced else "copy")
        return TensorOp(name, src, out_dtype, info.shape, action, t, r, src_dtype)

    ops = [op_for(name, name) for name in base]
    by_name = {op.name: op for op in ops}
    own = {view: op_for(view, base_key(view)) for view in views}
    untie = any(
        (op.src, op.terms, op.rows, op.src_dtype_name) != (held.src, held.terms, held.rows, held.src_dtype_name)
        for op, held in ((own[v], by_name[base_key(v)]) for v in views)
    )
    if untie:
        # The adapters made a tied tensor differ from its source: write every tensor the model tied
        # (tie_word_embeddings=false releases them all; BERT's decoder bias with its weight), each
        # as the adapter model has it. transformers loads a tied tensor the files hold as it is.
        ops += [dataclasses.replace(op, name=names.file_name_for(view)) for view, op in own.items()]
    return ops, untie
