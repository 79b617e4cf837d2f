"""Planning a merge or unmerge: which base tensors change, by which LoRA terms, checked from headers.

The result is a list of TensorOps (see ``ops.py``) for the merged form; ``augmented.py`` renames
them for the augmented form. Nothing here reads tensor data.
"""

from __future__ import annotations

import dataclasses
import math
import re

from ...adapter.names import (
    ROLE_A,
    ROLE_B,
    ROLE_B_BIAS,
    ROLE_EMB_A,
    ROLE_EMB_B,
    ROLE_MAGNITUDE,
    Role,
)
from ...adapter.tuned import TunedModule
from ...adapter.weights import LoraAdapter, LoraModule
from ...engine.plan import Ref
from ...errors import AdapterConfigError, IncompatibleError, UnsupportedError
from ...io.checkpoint import Checkpoint
from ...io.dtypes import is_floating, torch_name
from ...names import ModelNames
from ...ops.lora import CONV1D, LAYER_KINDS, LINEAR, LayerKind, LayerName
from ...ops.tuners import TUNERS
from .._inputs import FLOAT32_MAX
from .experts import expert_terms
from .ops import Action, BiasTerm, LoraTerm, RowPatch, TensorOp, Term, TunerTerm

# The roles of a LoRA module's own tensors, each of which must be a float tensor.
_FLOAT_ROLES: tuple[Role, ...] = (ROLE_EMB_A, ROLE_EMB_B, ROLE_A, ROLE_B, ROLE_MAGNITUDE, ROLE_B_BIAS)


def module_kind(
    module: LoraModule, weight_shape: tuple[int, ...], layer: LayerName | None, adapter: LoraAdapter
) -> LayerKind:
    """Linear, Conv1D, Embedding or Conv, checked against the base weight's shape; ``layer``: the kind the model
    holds the module as (``ModelNames.layers``), which decides a square weight."""
    a_role, b_role = LAYER_KINDS[module.kind].lora_roles
    a = adapter.checkpoint.info(module.keys[a_role]).shape
    b = adapter.checkpoint.info(module.keys[b_role]).shape
    candidates = [LAYER_KINDS[module.kind]]
    if module.kind == "linear":  # a Linear or GPT-2's Conv1D: the base weight's shape tells them apart
        square = LINEAR.delta_shape(a, b) == CONV1D.delta_shape(a, b)
        conv1d_first = square and (layer == "conv1d" or bool(adapter.config.raw.get("fan_in_fan_out")))
        candidates = [CONV1D, LINEAR] if conv1d_first else [LINEAR, CONV1D]
    for role in _FLOAT_ROLES:
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
    if found:
        raise UnsupportedError(f"{adapter.path}: not plain LoRA, cannot be merged: {'; '.join(found)}")
    has_dora = any(ROLE_MAGNITUDE in m.keys for m in adapter.modules.values())
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


_PER_EXPERT = re.compile(r"\.experts\.\d+\.")  # a per-expert module: mlp.experts.3.gate_proj


@dataclasses.dataclass(frozen=True)
class BaseTensors:
    """The base's tensors as adapters name them: file keys, and the tied tensors the files omit (views)."""

    base: Checkpoint
    names: ModelNames
    views: dict[str, str]  # in-memory tied tensors the files omit -> their in-memory source

    def plan_key(self, name: str) -> str | None:
        """An adapter's tensor name -> the file key it is, or the tied view it names."""
        file = self.names.file_key(name)
        if file is not None and file in self.base:
            return file
        if name in self.base:
            return name
        return name if name in self.views else None

    def block_of(self, name: str) -> tuple[str, int, int] | None:
        """(file key, first row, end row) of an in-memory tensor that is a block of a fused file tensor's rows."""
        block = self.names.row_blocks.get(name)
        if block is None or block[0] not in self.base:
            return None
        key, start, stop, of = block
        rows = self.base.info(key).shape[0]
        return key, rows * start // of, rows * stop // of

    def target(self, name: str, adapter: LoraAdapter, what: str) -> str:
        """The plan key of what ``adapter`` targets; refused by name when the base lacks it."""
        key = self.plan_key(name)
        block = self.block_of(name) if key is None else None
        if block is not None:
            raise UnsupportedError(
                f"{adapter.path}: {what} targets {name!r}, rows {block[1]}:{block[2]} of the base's fused "
                f"{block[0]!r}: only a LoRA pair (no DoRA, no lora_bias, no other tuner) is merged into fused rows"
            )
        if key is None:
            stack = self.stacked_experts_of(name)
            if stack is not None:
                raise UnsupportedError(
                    f"{adapter.path}: {what} is a LoRA on one expert ({name!r}: as transformers 4, ms-swift/Megatron "
                    f"and vLLM's per-expert format name them), and the base's files hold {stack!r} stacked: a "
                    "per-expert change into a stacked tensor is not merged yet (a base saved with per-expert "
                    "files takes it)"
                )
            raise IncompatibleError(
                f"{adapter.path}: {what} targets {name!r}, which the base model does not have "
                "(is this adapter for another model?)"
            )
        return key

    def stacked_experts_of(self, name: str) -> str | None:
        """For one expert's weight (``mlp.experts.3.gate_proj.weight``) the base lacks: the experts module whose
        files hold its experts stacked (3-D), if they do."""
        if not _PER_EXPERT.search(name):
            return None
        stack = _PER_EXPERT.sub(".experts.", name).rsplit(".", 2)[0]
        held = (n for n in self.base.names() if n.startswith(stack + "."))
        return stack if any(len(self.base.info(n).shape) == 3 for n in held) else None

    def base_key(self, key: str) -> str:
        """The file tensor behind a plan key: itself, or a tied view's source."""
        if key in self.base:
            return key
        source = self.names.file_key(self.views[key])
        assert source is not None  # tied_absent keeps only views whose source the files hold
        return source

    def tied_to(self, key: str) -> list[str]:
        """Plan keys of the tensors the model ties to file tensor ``key``: views the files omit, and ones they
        hold (T5's lm_head, whose config ties it whatever the files say: PEFT follows the config)."""
        source = self.names.memory_name(key)
        return [
            self.plan_key(t) or t for t, s in self.names.tied.items() if s == source and (self.plan_key(t) or t) != key
        ]

    def layer_of(self, key: str) -> LayerName | None:
        """The kind of layer the model holds plan key ``key``'s module as (the names', by in-memory name)."""
        return self.names.layers.get(self.names.memory_name(key).rpartition(".")[0])

    def shape_of(self, name: str, adapter: LoraAdapter) -> tuple[int, ...]:
        """The base shape of plan key ``name``; only a float tensor can be merged."""
        info = self.base.info(self.base_key(name))
        if not is_floating(info.dtype_name):
            raise IncompatibleError(
                f"{adapter.path}: targets {name!r}, a {torch_name(info.dtype_name)} tensor in the base: only float "
                "weights can be merged"
            )
        return info.shape

    def same_shape(self, name: str, adapter: LoraAdapter, key: str, what: str) -> None:
        """Refuse an adapter tensor ``key`` that stands for ``name`` but has another shape."""
        want, got = self.shape_of(name, adapter), adapter.checkpoint.info(key).shape
        if got != want:
            raise IncompatibleError(
                f"{adapter.path}: {what} {key!r} is {list(got)}, the base's {name!r} is {list(want)} "
                "(is this adapter for another model, or for a resized vocabulary?)"
            )


def signed_scale(adapter: LoraAdapter, module: LoraModule, weight: float, scale: float, sign: float) -> float:
    """sign × weight × alpha/r of one module, refused when it does not fit float32 arithmetic."""
    signed = sign * weight * scale
    if not math.isfinite(signed) or abs(signed) > FLOAT32_MAX:
        raise AdapterConfigError(
            f"{adapter.path}: module {module.name!r}: its scale (weight {weight:g} x alpha/r {scale:g}) "
            "does not fit float32 arithmetic; check lora_alpha and the weight"
        )
    return signed


def check_magnitude(adapter: LoraAdapter, magnitude: Ref, kind: LayerKind, shape: tuple[int, ...], wname: str) -> None:
    """A DoRA magnitude holds one value per output unit of the weight it scales."""
    numel = adapter.checkpoint.info(magnitude.key).numel
    units = shape[1] if kind.transposed else shape[0]
    if numel != units:
        raise IncompatibleError(
            f"{adapter.path}: DoRA magnitude {magnitude.key!r} has {numel} values, {wname!r} has {units} output units"
        )


@dataclasses.dataclass
class Changes:
    """What the adapters do to the base, by plan key, collected adapter by adapter."""

    tensors: BaseTensors
    sign: float  # -1 for unmerge
    terms: dict[str, list[Term]] = dataclasses.field(default_factory=dict)  # LoRA and lora_bias terms
    saved: dict[str, Ref] = dataclasses.field(default_factory=dict)  # W0 as the adapter saved it
    rows: dict[str, list[RowPatch]] = dataclasses.field(default_factory=dict)  # trainable tokens
    replaced: dict[str, Ref] = dataclasses.field(default_factory=dict)  # full trained tensors

    def add_adapter(self, source: int, adapter: LoraAdapter, weight: float) -> None:
        """Everything adapter number ``source`` (its merge weight ``weight``) changes."""
        stacked: dict[str, str] = {}  # stacked parameter -> the wrapper adapting it
        for module in adapter.modules.values():
            on_stack = adapter.config.target_parameters and module.kind == "linear"
            if on_stack and self.tensors.plan_key(module.weight_name) is None:
                self.add_stacked_module(source, adapter, weight, module, stacked)
            else:
                self.add_module(source, adapter, weight, module)
        for tuned in adapter.tuned.values():
            self.add_tuned(source, adapter, weight, tuned)
        self.add_saved_weights(source, adapter)
        self.add_replacements(source, adapter)
        self.add_token_deltas(source, adapter)

    def add_tuned(self, source: int, adapter: LoraAdapter, weight: float, module: TunedModule) -> None:
        """A module of a tuner other than LoRA (``ops.tuners``) on one weight, and on its bias where the tuner
        changes that too (IA³, LN tuning); the module's settings read off the config now, from headers."""
        tensors, tuner = self.tensors, TUNERS[module.tuner]
        wname = tensors.target(module.weight_name, adapter, f"module {module.name!r}")
        shape = tensors.shape_of(wname, adapter)
        layer = tensors.layer_of(wname) or ("norm" if len(shape) == 1 else "conv" if len(shape) == 4 else "linear")
        refs = {part: Ref(source, key) for part, key in module.keys.items()}
        shapes = {part: adapter.checkpoint.info(ref.key).shape for part, ref in refs.items()}
        what = f"{adapter.path}: {adapter.config.peft_type} module {module.name!r}"
        try:
            config = tuner.module_config(adapter.config.raw, module.name, shapes, layer=layer)
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterConfigError(f"{what}: adapter_config.json does not say how to merge it ({exc})") from None
        if weight != 1.0 and not tuner.additive:
            raise UnsupportedError(f"{what}: {module.tuner} multiplies the weight, so it merges with weight 1 only")
        if self.sign < 0 and not tuner.invertible:
            raise UnsupportedError(
                f"{what}: {module.tuner} cannot be unmerged from the merged weights alone "
                "(PEFT keeps a copy of W0 for it, or has no unmerge)"
            )
        parts = tuple(refs.items())
        self.terms.setdefault(wname, []).append(TunerTerm(module.tuner, parts, config, weight, self.sign < 0))
        bname = tensors.plan_key(module.bias_name) if tuner.bias else None
        if bname is not None:  # the bias's change may depend on the weight (GLoRA's): W as the input holds it
            w0 = Ref(0, tensors.base_key(wname))
            term = TunerTerm(module.tuner, parts, config, 1.0, self.sign < 0, True, w0)
            self.terms.setdefault(bname, []).append(term)

    def add_stacked_module(
        self, source: int, adapter: LoraAdapter, weight: float, module: LoraModule, stacked: dict[str, str]
    ) -> None:
        """A LoRA on a stacked MoE parameter: one term per file tensor its change lands in."""
        tensors = self.tensors
        parameter, scale, shares = expert_terms(module, adapter, tensors.names, tensors.base)
        if parameter in stacked:
            raise IncompatibleError(
                f"{adapter.path}: modules {stacked[parameter]!r} and {module.name!r} both adapt {parameter!r}"
            )
        stacked[parameter] = module.name
        a, b = Ref(source, module.keys[ROLE_A]), Ref(source, module.keys[ROLE_B])
        for key, kind in shares:
            term = LoraTerm(kind, a, b, signed_scale(adapter, module, weight, scale, self.sign))
            self.terms.setdefault(key, []).append(term)

    def add_module(self, source: int, adapter: LoraAdapter, weight: float, module: LoraModule) -> None:
        """A LoRA module on one weight (DoRA's magnitude included), and its lora_bias."""
        tensors = self.tensors
        block = tensors.block_of(module.weight_name) if tensors.plan_key(module.weight_name) is None else None
        if block is not None and set(module.keys) == {ROLE_A, ROLE_B}:
            self.add_block(source, adapter, weight, module, block)
            return
        wname = tensors.target(module.weight_name, adapter, f"module {module.name!r}")
        kind = module_kind(module, tensors.shape_of(wname, adapter), tensors.layer_of(wname), adapter)
        a_role, b_role = kind.lora_roles
        a, b = Ref(source, module.keys[a_role]), Ref(source, module.keys[b_role])
        mag = Ref(source, module.keys[ROLE_MAGNITUDE]) if ROLE_MAGNITUDE in module.keys else None
        if mag is not None:
            check_magnitude(adapter, mag, kind, tensors.shape_of(wname, adapter), wname)
        scale = signed_scale(adapter, module, weight, module.scale, self.sign)
        self.terms.setdefault(wname, []).append(LoraTerm(kind, a, b, scale, mag))
        if ROLE_B_BIAS in module.keys:
            bname = tensors.target(module.bias_name, adapter, f"lora_bias of {module.name!r}")
            self.terms.setdefault(bname, []).append(BiasTerm(Ref(source, module.keys[ROLE_B_BIAS]), scale))

    def add_block(
        self, source: int, adapter: LoraAdapter, weight: float, module: LoraModule, block: tuple[str, int, int]
    ) -> None:
        """A LoRA module on a block of rows of a fused tensor (q_proj in OpenCLIP's in_proj_weight): its term on
        the fused tensor, adding to those rows alone."""
        key, start, stop = block
        full = self.tensors.shape_of(key, adapter)
        kind = module_kind(module, (stop - start, *full[1:]), "linear", adapter)
        a, b = Ref(source, module.keys[ROLE_A]), Ref(source, module.keys[ROLE_B])
        scale = signed_scale(adapter, module, weight, module.scale, self.sign)
        self.terms.setdefault(key, []).append(LoraTerm(kind, a, b, scale, rows=(start, stop)))

    def add_saved_weights(self, source: int, adapter: LoraAdapter) -> None:
        """W0 itself: merge adds to it, unmerge restores it."""
        for name, key in adapter.base_weights.items():
            planned = self.tensors.target(name, adapter, "a saved base_layer weight")
            self.saved[planned] = Ref(source, key)
            self.tensors.same_shape(planned, adapter, key, "the saved base_layer weight")

    def add_replacements(self, source: int, adapter: LoraAdapter) -> None:
        """Full trained tensors (modules_to_save, trained biases): they replace the base's."""
        for name, key in adapter.replacements.items():
            planned = self.tensors.target(name, adapter, "a full trained tensor")
            self.replaced[planned] = Ref(source, key)
            self.tensors.same_shape(planned, adapter, key, "the full trained tensor")

    def add_token_deltas(self, source: int, adapter: LoraAdapter) -> None:
        """Trainable tokens: rows patched in the embedding and in every module tied to it."""
        tensors = self.tensors
        for token_module, key in adapter.token_deltas.items():
            indices = adapter.config.token_indices(token_module)
            assert indices is not None  # load_adapter refuses token deltas the config does not name
            wname = tensors.target(f"{token_module}.weight", adapter, "trainable tokens")
            rows_, dim = tensors.shape_of(wname, adapter)[:2]
            if adapter.checkpoint.info(key).shape != (len(indices), dim) or not all(0 <= t < rows_ for t in indices):
                raise IncompatibleError(
                    f"{adapter.path}: trainable tokens {key!r} {list(adapter.checkpoint.info(key).shape)} do not fit "
                    f"token ids {list(indices)[:5]}... of {wname!r} {[rows_, dim]}"
                )
            patch = RowPatch(indices, Ref(source, key))
            self.rows.setdefault(wname, []).append(patch)
            for tied_key in tensors.tied_to(wname):  # PEFT wraps every module tied to the embedding with its tokens
                self.rows.setdefault(tied_key, []).append(patch)

    def share_tied_saved_weights(self) -> None:
        """A saved W0 of any tied module is loaded by PEFT into the one shared tensor."""
        for view in self.tensors.views:
            source_key = self.tensors.base_key(view)
            shared = self.saved.get(source_key) or self.saved.get(view)
            if shared is not None:
                self.saved[source_key] = self.saved[view] = shared


def tensor_op(
    changes: Changes, name: str, src_name: str, adapters: list[LoraAdapter], *, dtype: str | None, unmerge: bool
) -> TensorOp:
    """The op writing plan key ``name``, whose base tensor is ``src_name``."""
    info = changes.tensors.base.info(src_name)
    out_dtype = dtype if (dtype is not None and is_floating(info.dtype_name)) else info.dtype_name
    saved = changes.saved.get(name) if name not in changes.replaced else None
    # A saved W0 is taken at the base's dtype, as the adapter model holds it.
    src_dtype = None
    if saved is not None and adapters[saved.source - 1].checkpoint.info(saved.key).dtype_name != info.dtype_name:
        src_dtype = info.dtype_name
    if unmerge and saved is not None:  # the adapter holds W0 itself: write it back, exactly
        return TensorOp(name, saved, out_dtype, info.shape, "restore", src_dtype_name=src_dtype)
    src = changes.replaced.get(name) or saved or Ref(0, src_name)
    t, r = tuple(changes.terms.get(name, ())), tuple(changes.rows.get(name, ()))
    changed: Action = "unmerge" if unmerge else "merge"
    action: Action = changed if (t or r) else ("replace" if name in changes.replaced else "copy")
    return TensorOp(name, src, out_dtype, info.shape, action, t, r, src_dtype)


def plan_merge(
    base: Checkpoint,
    adapters: list[LoraAdapter],
    weights: list[float],
    names: ModelNames,
    *,
    dtype: str | None,
    unmerge: bool = False,
) -> tuple[list[TensorOp], bool]:
    """One op per output tensor, in base order, and whether a tied tensor had to be untied (and added).

    Ops are keyed by the files' own names; an adapter names tensors as they are in memory (under
    transformers 5, renamed), or as the files name them (as under transformers 4): both resolve.
    A tied tensor the files omit (a tied head) is a view of its source with its own ops. Each module's layer
    kind is ``names``'.
    """
    tensors = BaseTensors(base, names, names.tied_absent(set(base)))
    changes = Changes(tensors, sign=-1.0 if unmerge else 1.0)
    for source, (adapter, weight) in enumerate(zip(adapters, weights, strict=True), start=1):
        changes.add_adapter(source, adapter, weight)
    changes.share_tied_saved_weights()

    ops = [tensor_op(changes, name, name, adapters, dtype=dtype, unmerge=unmerge) for name in base]
    by_name = {op.name: op for op in ops}
    own = {
        view: tensor_op(changes, view, tensors.base_key(view), adapters, dtype=dtype, unmerge=unmerge)
        for view in tensors.views
    }
    if any(a.config.raw.get("ensure_weight_tying") for a in adapters):
        # PEFT ties a tied module's LoRA to its source's (LoraConfig.ensure_weight_tying): a tied head the adapter
        # does not change on its own changes with the embedding, and stays tied
        own = {v: by_name[tensors.base_key(v)] if op.action == "copy" else op for v, op in own.items()}
    untie = any(
        (op.src, op.terms, op.rows, op.src_dtype_name) != (held.src, held.terms, held.rows, held.src_dtype_name)
        for op, held in ((own[v], by_name[tensors.base_key(v)]) for v in tensors.views)
    )
    if untie:
        # The adapters made a tied tensor differ from its source: write every tensor the model tied
        # (tie_word_embeddings=false releases them all; BERT's decoder bias with its weight), each
        # as the adapter model has it. transformers loads a tied tensor the files hold as it is.
        ops += [dataclasses.replace(op, name=names.file_name_for(view)) for view, op in own.items()]
    return ops, untie
