"""LoRA math, exactly as PEFT defines it. Pure functions of tensors; inputs are never modified.

Everything is computed in float32 (callers pass float32 or get it back) and rounded once, by the
caller, to the output dtype.

Layouts (s = scale):
  linear     W (out, in),        A (r, in),          B (out, r)        ΔW = s·B@A
  conv1d     W (in, out),        A (r, in),          B (out, r)        ΔW = (s·B@A)ᵀ   (GPT-2's Conv1D)
  embedding  W (num, dim),       A (r, num),         B (dim, r)        ΔW = (s·B@A)ᵀ
  conv       W (out, in, k, k),  A (r, in, k, k),    B (out, r, 1, 1)  ΔW = s·einsum(B, A)
  experts    W (E, out, in),     A (E·r, in),        B (out, E·r)      ΔW[e] = s·B[:, e::E]@A[e·r:(e+1)·r]
             (PEFT's target_parameters on stacked MoE experts; stored (E, in, out), as GPT-OSS does: ΔW[e]ᵀ)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..adapter.names import ROLE_A, ROLE_B, ROLE_EMB_A, ROLE_EMB_B, Role

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch


# The one vocabulary of layer kinds: LayerKind.name, ModelNames.layers (all but experts), extract's kinds.
LayerName = Literal["linear", "conv1d", "embedding", "conv", "experts"]


@dataclass(frozen=True)
class LayerKind:
    """How one kind of base layer turns LoRA factors into ΔW (PEFT's layer variants, one object each).

    ``transposed``: the base weight is stored (in, out), so ΔW = (s·B@A)ᵀ (GPT-2's Conv1D; an
    Embedding, which PEFT treats as fan_in_fan_out). ``lora_roles``: the adapter roles of its A and B.
    ``matrix``: ΔW is one product ``left @ right`` of the weight's own 2-D shape (``factors``).
    """

    name: LayerName
    transposed: bool
    lora_roles: tuple[Role, Role] = (ROLE_A, ROLE_B)
    matrix: bool = True

    def delta_shape(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The base weight shape an A/B pair implies (for validation from headers)."""
        return (a_shape[1], b_shape[0]) if self.transposed else (b_shape[0], a_shape[1])

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) in float32 with ΔW = scale · left @ right."""
        a32, b32 = a.to(torch.float32), b.to(torch.float32)
        return (a32.T, b32.T) if self.transposed else (b32, a32)  # (B@A)ᵀ = Aᵀ@Bᵀ

    def delta(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        """ΔW in float32, shaped like the base weight."""
        product = (b.to(torch.float32) @ a.to(torch.float32)) * scale
        return product.T if self.transposed else product

    def norm_dims(self, ndim: int) -> tuple[int, ...]:
        """The axes DoRA's norm runs over: each output unit (a row; a column when stored transposed)."""
        return (0,) if self.transposed else (1,)


@dataclass(frozen=True)
class _ConvKind(LayerKind):
    """Conv2d: W (out, in, k, k), A (r, in, k, k), B (out, r, 1, 1), ΔW = s·einsum(B, A)."""

    def delta_shape(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (b_shape[0], *a_shape[1:])

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("a conv LoRA is not one matrix product of the weight's shape: use delta()")

    def delta(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        a32, b32 = a.to(torch.float32), b.to(torch.float32)
        if a32.shape[2:] == (1, 1) and a32.dim() == 4:
            return ((b32.flatten(1) @ a32.flatten(1)) * scale)[:, :, None, None]
        return torch.einsum("or,rikl->oikl", b32.flatten(1), a32) * scale

    def norm_dims(self, ndim: int) -> tuple[int, ...]:
        return tuple(range(1, ndim))


def expert_columns(expert: int, experts: int, rank: int, *, grouped: bool = False) -> slice:
    """The columns of a stacked-experts B (out, E·r) that are ``expert``'s, in rank order (A's rows e·r..(e+1)·r):
    PEFT's ParamWrapper packs B rank-major, expert fastest (``reshape(out, r, E)``); ``grouped``: by expert
    (``view(out, E, r)``), as Unsloth's grouped-GEMM forward read it before unsloth-zoo #1269."""
    if grouped:
        return slice(expert * rank, (expert + 1) * rank)
    return slice(expert, experts * rank, experts)


@dataclass(frozen=True)
class ExpertSlice(LayerKind):
    """One expert's part of a LoRA on stacked experts, for a weight that holds expert ``expert`` alone
    (per-expert files: Mixtral's ``experts.3.w1``): ΔW[e] = s·B_e@A_e (its transpose when the stack is
    stored (E, in, out)), of which the weight holds ``rows`` (fused gate/up: the gate rows, the up rows)
    or ``cols``, when set."""

    expert: int = 0
    experts: int = 1
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    grouped: bool = False  # B's columns grouped by expert (Unsloth's packing before unsloth-zoo #1269)

    def delta_shape(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
        d1, d2 = super().delta_shape(a_shape, b_shape)  # one expert's ΔW, oriented as the stack stores it
        d1 = self.rows[1] - self.rows[0] if self.rows else d1
        d2 = self.cols[1] - self.cols[0] if self.cols else d2
        return (d1, d2)

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = a.shape[0] // self.experts
        a_e = a[self.expert * r : (self.expert + 1) * r]  # expert-major rows
        b_e = b[:, expert_columns(self.expert, self.experts, r, grouped=self.grouped)]
        left, right = super().factors(a_e, b_e)
        if self.rows:
            left = left[self.rows[0] : self.rows[1]]
        if self.cols:
            right = right[:, self.cols[0] : self.cols[1]]
        return left, right

    def delta(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        left, right = self.factors(a, b)
        return (left @ right) * scale


@dataclass(frozen=True)
class StackedExperts(LayerKind):
    """A LoRA on a stacked expert parameter held whole (E, out, in) -- or (E, in, out) when ``transposed``
    (GPT-OSS) -- as files written in the fused layout hold it."""

    matrix: bool = False
    experts: int = 1
    grouped: bool = False  # B's columns grouped by expert (Unsloth's packing before unsloth-zoo #1269)

    def delta_shape(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.experts, *super().delta_shape(a_shape, b_shape))

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("stacked experts are E matrix products: use delta()")

    def delta(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        e = self.experts
        a_e = a.to(torch.float32).reshape(e, -1, a.shape[-1])  # (E, r, in)
        if self.grouped:  # B.view(out, E, r)
            b_e = b.to(torch.float32).reshape(b.shape[0], e, -1).permute(1, 0, 2)  # (E, out, r)
        else:  # PEFT's B.reshape(out, r, E)
            b_e = b.to(torch.float32).reshape(b.shape[0], -1, e).permute(2, 0, 1)
        product = torch.bmm(b_e, a_e) * scale
        return product.transpose(1, 2) if self.transposed else product

    def norm_dims(self, ndim: int) -> tuple[int, ...]:
        raise TypeError("PEFT has no DoRA for stacked experts")


LINEAR = LayerKind("linear", transposed=False)
CONV1D = LayerKind("conv1d", transposed=True)
EMBEDDING = LayerKind("embedding", transposed=True, lora_roles=(ROLE_EMB_A, ROLE_EMB_B))
CONV = _ConvKind("conv", transposed=False, matrix=False)
LAYER_KINDS: dict[str, LayerKind] = {k.name: k for k in (LINEAR, CONV1D, EMBEDDING, CONV)}


def add_lora(
    weight32: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, kind: LayerKind, *, inplace: bool = False
) -> torch.Tensor:
    """``weight32 + ΔW`` in float32, fused into one matrix multiply-add where possible.

    With ``inplace`` the caller hands ``weight32`` over (it must own it) and gets it back updated,
    which saves allocating and faulting in a second model-sized buffer.
    """
    if kind.matrix:
        left, right = kind.factors(a, b)
        if inplace:
            return weight32.addmm_(left, right, alpha=scale)
        return torch.addmm(weight32, left, right, alpha=scale)
    if inplace:
        return weight32.add_(kind.delta(a, b, scale))
    return weight32 + kind.delta(a, b, scale)


def add_lora_rowwise(
    weight: torch.Tensor,
    terms: list[tuple[torch.Tensor, torch.Tensor, float]],
    out: torch.Tensor,
    *,
    block: int = 1 << 18,
) -> bool:
    """``out = round(weight + Σ scale · left @ right)``, a block of rows at a time.

    The same arithmetic as converting ``weight`` to float32, ``addmm_`` of each term in order and
    one rounding to ``out.dtype`` -- but each block of about ``block`` elements is converted,
    updated and rounded while it sits in the CPU cache, instead of three passes over memory with a
    model-sized float32 copy. ``out`` may be ``weight`` itself (each block is read before it is
    overwritten). ``terms`` are (left (rows, r), right (r, cols), scale) in float32.

    Returns True when every element of ``out`` is provably finite; False means some element may
    be NaN/Inf (or the check's own sum overflowed) and the caller must look exactly.
    """
    rows, cols = weight.shape
    step = max(1, block // max(cols, 1))
    work = torch.empty(min(step, rows), cols, dtype=torch.float32, device=weight.device)
    sums = torch.empty(-(-rows // step), dtype=torch.float32, device=weight.device)
    # Σx² finite means every |x| < 2^64: finite, and still finite once rounded to a dtype with
    # bf16's range. Narrower dtypes (float16) can overflow when rounding: sum the rounded block.
    wide = torch.finfo(out.dtype).max >= torch.finfo(torch.bfloat16).max
    for k, i in enumerate(range(0, rows, step)):
        j = min(i + step, rows)
        w = work[: j - i].copy_(weight[i:j])
        for left, right, scale in terms:
            w.addmm_(left[i:j], right, alpha=scale)
        if wide:
            flat = w.view(-1)
            sums[k] = torch.dot(flat, flat)  # NaN and Inf propagate, and cheaper than a sum of bf16
        o = out[i:j]
        o.copy_(w)
        if not wide:
            sums[k] = o.sum(dtype=torch.float32)
    return bool(torch.isfinite(sums.sum()))


def dora_apply(
    base: torch.Tensor, current: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, kind: LayerKind
) -> torch.Tensor:
    """One DoRA adapter merged: ``(m / ‖W0 + ΔW‖) · (current + ΔW)``.

    ``base`` is the original W0 (the norm is always taken from it, as PEFT's forward does);
    ``current`` is the weight with any previous adapters already merged (== base for one adapter).
    """
    dims = kind.norm_dims(base.dim())
    norm = torch.linalg.vector_norm(base.to(torch.float32) + delta, dim=dims, keepdim=True)
    mag = magnitude.to(torch.float32).reshape(norm.shape)
    result: torch.Tensor = (mag / norm) * (current.to(torch.float32) + delta)
    return result


def replace_rows(weight: torch.Tensor, rows: tuple[int, ...], values: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` (num, dim) with the token rows ``rows`` replaced (PEFT trainable tokens)."""
    out = weight.clone()
    out[torch.tensor(rows, dtype=torch.long, device=out.device)] = values.to(device=out.device, dtype=out.dtype)
    return out


def all_finite(x: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf; one cheap reduction first, the exact test only if it fails."""
    if not x.is_floating_point():
        return True
    if torch.isfinite(x.sum(dtype=torch.float32)):
        return True  # NaN and Inf propagate through a sum
    return bool(torch.isfinite(x).all())  # the sum may also have overflowed
