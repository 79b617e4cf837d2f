"""One merge op computed (the engine's compute for a merge: compute_op): W0 + Σ ΔW in float32, rounded once to the
output dtype; a RequantOp's result re-quantized (merge.quantized)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...engine.execute import Outcome
from ...engine.plan import Ref
from ...errors import UnsupportedError
from ...ops.lora import add_lora, add_lora_rowwise, dora_apply, replace_rows
from ...ops.tuners import TUNERS
from .._results import check_finite
from .ops import BiasTerm, LoraTerm, MergeOp, RequantOp, TensorOp, TunerTerm

if TYPE_CHECKING:
    import torch

    from .quantized import RequantReport
else:
    from ..._lazy import torch


def compute_op(
    op: MergeOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device, *, allow_nonfinite: bool = False
) -> Outcome[RequantReport | None]:
    """The engine's compute for a merge's ops: a RequantOp re-quantized, a plain TensorOp merged."""
    if isinstance(op, RequantOp):
        from .quantized import compute_requant  # which computes its float32 result here (compute_merge)

        done = compute_requant(op, tensors, device, allow_nonfinite=allow_nonfinite)
        return Outcome(done.outputs, done.info)
    return Outcome(compute_merge(op, tensors, device, allow_nonfinite=allow_nonfinite).outputs, None)


def compute_merge(
    op: TensorOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device, *, allow_nonfinite: bool = False
) -> Outcome[None]:
    """Apply one merge op to its fetched tensors: fp32 throughout, rounded once to the output dtype."""
    src = stacked(op.stack, tensors) if op.stack else tensors[op.src]
    if op.src_dtype is not None and src.dtype != op.src_dtype:
        src = src.to(op.src_dtype)
    if not (op.terms or op.rows):  # a copy, a replacement, a restored W0: one rounding at most
        return Outcome([(op.name, src if src.dtype == op.dtype else src.to(device).to(op.dtype).cpu())], None)
    if device.type == "cpu" and _rowwise(op, src):
        return _merge_rowwise(op, src, tensors, allow_nonfinite)
    base = src.to(device=device, dtype=torch.float32)
    # The fetched tensor is ours (a fresh read), so the sum can be built in place in its fp32 copy,
    # except that DoRA needs the untouched W0 for its norms.
    dora = any(isinstance(t, LoraTerm) and t.magnitude is not None for t in op.terms)
    cur = base.clone() if dora else base
    for term in op.terms:
        if isinstance(term, TunerTerm):
            cur = apply_tuner(op.name, term, cur, tensors, device)
            continue
        b = tensors[term.b].to(device)
        if isinstance(term, BiasTerm):
            cur = cur + term.scale * b.to(torch.float32)
            continue
        a = tensors[term.a].to(device)
        if term.magnitude is not None:
            delta = term.kind.delta(a, b, term.scale)
            cur = dora_apply(base, cur, delta, tensors[term.magnitude].to(device), term.kind)
        elif term.rows is not None:  # a module fused into these rows (the plan refuses DoRA there)
            start, stop = term.rows
            cur[start:stop] = add_lora(cur[start:stop], a, b, term.scale, term.kind, inplace=True)
        else:
            cur = add_lora(cur, a, b, term.scale, term.kind, inplace=not dora)
    for patch in op.rows:
        cur = replace_rows(cur, patch.indices, tensors[patch.values])
    if not allow_nonfinite:
        check_finite(op.name, cur)  # cheap on fp32
    out = cur.to(op.dtype).to("cpu")
    if not allow_nonfinite and out.is_floating_point() and torch.finfo(out.dtype).max < torch.finfo(torch.float32).max:
        check_finite(op.name, out)  # a narrower dtype (float16) can overflow when rounding
    return Outcome([(op.name, out)], None)


def apply_tuner(
    name: str, term: TunerTerm, cur: torch.Tensor, tensors: Mapping[Ref, torch.Tensor], device: torch.device
) -> torch.Tensor:
    """One module of a tuner other than LoRA on ``cur`` (float32): ops.tuners' math, PEFT's merge or unmerge."""
    tuner = TUNERS[term.tuner]
    parts = {part: tensors[ref].to(device=device, dtype=torch.float32) for part, ref in term.parts}
    if term.bias:
        w0 = None if term.w0 is None else tensors[term.w0].to(device=device, dtype=torch.float32)
        if w0 is not None and term.unmerge:  # the input holds the merged weight: W0 is its unmerge
            w0 = tuner.unmerge(w0, parts, term.config)
        done = (tuner.unmerge_bias if term.unmerge else tuner.merge_bias)(cur, parts, term.config, w0=w0)
        return cur if done is None else done
    if term.weight != 1.0:  # only additive tuners are planned with a weight: W ± weight·ΔW
        delta = tuner.delta(cur, parts, term.config)
        return cur - term.weight * delta if term.unmerge else cur + term.weight * delta
    if not term.unmerge:
        return tuner.merge(cur, parts, term.config)
    undone = tuner.unmerge(cur, parts, term.config)
    if undone is None:  # the plan refuses these first: a guard, not a path
        raise UnsupportedError(f"{name}: {term.tuner} cannot be unmerged")
    return undone


def stacked(parts: tuple[tuple[Ref, ...], ...], tensors: Mapping[Ref, torch.Tensor]) -> torch.Tensor:
    """Experts stacked on axis 0, their parts concatenated on axis 1 (transformers' MergeModulelist +
    Concatenate, as it fuses Mixtral's w1/w3 into gate_up_proj on load)."""
    first = tensors[parts[0][0]]
    rows = [tensors[part[0]].shape[0] for part in parts]
    out = torch.empty((len(parts[0]), sum(rows), *first.shape[1:]), dtype=first.dtype)
    start = 0
    for part, size in zip(parts, rows, strict=True):  # one copy of each part, straight into place
        for e, ref in enumerate(part):
            out[e, start : start + size].copy_(tensors[ref])
        start += size
    return out


def _rowwise(op: TensorOp, src: torch.Tensor) -> bool:
    """Whether an op is the common case: plain LoRA products added to a float matrix."""
    return (
        src.dim() == 2
        and src.is_floating_point()
        and op.dtype.is_floating_point
        and not op.rows
        and all(isinstance(t, LoraTerm) and t.kind.matrix and t.magnitude is None and t.rows is None for t in op.terms)
    )


def _merge_rowwise(
    op: TensorOp, src: torch.Tensor, tensors: Mapping[Ref, torch.Tensor], allow_nonfinite: bool
) -> Outcome[None]:
    """compute_merge's common case on CPU: the same arithmetic, in one cache-friendly pass.

    The fetched ``src`` is ours (a fresh read), so a result of the same dtype overwrites it.
    """
    terms = [(*t.kind.factors(tensors[t.a], tensors[t.b]), t.scale) for t in op.terms if isinstance(t, LoraTerm)]
    out = src if src.dtype == op.dtype and src.is_contiguous() else torch.empty(op.shape, dtype=op.dtype)
    finite = add_lora_rowwise(src, terms, out)
    if not finite and not allow_nonfinite:
        check_finite(op.name, out)
    return Outcome([(op.name, out)], None)
