"""resize and combine: adapters as algebra, never forming a dense ΔW.

``resize`` gives an adapter a lower rank; ``combine`` makes one adapter of the weighted sum of
several. Per module, the change Σ wᵢ·sᵢ·Bᵢ Aᵢ is one product B A of stacked factors (B = [w₁s₁B₁ |
w₂s₂B₂ | …], A = [A₁; A₂; …]); its SVD comes from QR of B and of Aᵀ and the SVD of a small core
(``ops.lowrank.product_svd``), so the best rank-k factors are exact (Eckart–Young on the adapter's
own product) at the cost of a few (m + n)·r products. combine without a target rank stores the
stacked factors themselves: exact, at rank Σ rᵢ. Ranks come from ``--rank``, ``--energy`` (per
module) or ``--budget`` (all modules at once, ``ops.lowrank.allocate``). The config has r = lora_alpha =
the largest rank kept and the other ranks in ``rank_pattern``; each module's B carries k / r, so whoever
scales by alpha / rank (PEFT, llama.cpp's single alpha, vLLM) gets exactly the change kept.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..adapter.config import CONFIG_NAME
from ..adapter.weights import LoraAdapter, LoraModule, load_adapter
from ..engine.execute import Discard, Outcome, Progress, run
from ..engine.plan import Ref
from ..errors import IncompatibleError, InvalidOptionError, UnsupportedError
from ..hub.cards import CARD_NAME, model_card
from ..io.dtypes import itemsize
from ..io.layout import TensorSpec, parse_size
from ..io.sidecar import config_bytes
from ..io.spool import SpoolWriter
from ..ops.lowrank import allocate, product_svd, rank_for_energy, split
from ._inputs import Input, check_weights, prepare

VLLM_MAX_RANK = 512  # vllm/config/lora.py MaxLoRARanks
VLLM_WHOLE = (".classifier.weight", ".classifier.bias", ".score.weight", ".score.bias")  # whole tensors it loads


@dataclass(frozen=True)
class Target:
    """How many components to keep: one of rank, energy, budget (parameters); none keeps them all."""

    rank: int | None = None
    energy: float | None = None
    budget: int | None = None  # parameters
    max_rank: int | None = None

    @classmethod
    def parse(
        cls,
        *,
        rank: int | None,
        energy: float | None,
        budget: str | int | None,
        budget_params: int | None,
        max_rank: int | None,
        itemsize: int,
        required: bool,
    ) -> Target:
        """Checked by option name; a --budget in bytes becomes parameters of ``itemsize`` bytes."""
        given = [n for n, v in (("--rank", rank), ("--energy", energy), ("--budget", budget)) if v is not None]
        given += ["--budget-params"] if budget_params is not None else []
        if len(given) > 1:
            raise InvalidOptionError(f"{' and '.join(given)}: give one of them")
        if required and not given:
            raise InvalidOptionError("give --rank N, --energy F or --budget SIZE (e.g. 15MB)")
        if rank is not None and rank < 1:
            raise InvalidOptionError(f"--rank must be at least 1, got {rank}")
        if energy is not None and not 0 < energy <= 1:
            raise InvalidOptionError(f"--energy must be in (0, 1], got {energy}")
        if max_rank is not None and max_rank < 1:
            raise InvalidOptionError(f"--max-rank must be at least 1, got {max_rank}")
        params = budget_params
        if budget is not None:
            try:
                params = parse_size(budget) // itemsize
            except ValueError as exc:
                raise InvalidOptionError(f"--budget {budget!r}: {exc}") from None
        if params is not None and params < 1:
            raise InvalidOptionError(f"the budget must hold at least one parameter, got {params}")
        return cls(rank, energy, params, max_rank)

    @property
    def exact(self) -> bool:
        return self.rank is None and self.energy is None and self.budget is None


@dataclass(frozen=True)
class ModuleOp:
    """One module: its terms (A ref, B ref, factor) from every adapter that has it, and its output keys."""

    name: str
    kind: str  # linear | embedding | conv
    terms: tuple[tuple[Ref, Ref, float], ...]
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]  # of the first adapter's A: (r, in) or (r, in, kh, kw)
    b_shape: tuple[int, ...]
    ranks: tuple[int, ...]  # of each term
    nbytes: int
    byte_copy: TensorSpec | None = None

    def refs(self) -> list[Ref]:
        return [r for a, b, _ in self.terms for r in (a, b)]

    @property
    def cost(self) -> int:
        """Parameters per rank component: in + out."""
        return math.prod(self.a_shape[1:]) + self.b_shape[0]

    @property
    def rank(self) -> int:
        return sum(self.ranks)


@dataclass(frozen=True)
class CopyOp:
    """A tensor carried over as it is (modules_to_save, a saved W0)."""

    name: str
    src: Ref
    spec: TensorSpec

    def refs(self) -> list[Ref]:
        return [self.src]

    @property
    def nbytes(self) -> int:
        return math.prod(self.spec.shape) * itemsize(self.spec.dtype)

    @property
    def byte_copy(self) -> TensorSpec:
        return self.spec


@dataclass(frozen=True)
class ModuleResult:
    name: str
    rank_in: int  # Σ of the input adapters' ranks
    rank: int  # kept
    kept: float  # share of ‖ΔW‖² kept
    energy: float  # ‖ΔW‖²


@dataclass(frozen=True)
class ResizeReport:
    """What resize / combine did; ``to_dict()`` is resize_report.json."""

    output: str | None
    inputs: list[str]
    weights: list[float]
    method: dict[str, Any]
    modules: list[ModuleResult]
    parameters_in: int
    parameters: int
    kept: float  # Σ kept σ² / Σ ‖ΔW‖² over all modules
    dry_run: bool = False
    copied: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def summary(self) -> str:
        head = f"{'Would write' if self.dry_run else 'Wrote'} {self.output}: {len(self.modules)} modules"
        if self.dry_run:
            return head + f", {self.parameters_in:,} LoRA parameters in ({', '.join(self.inputs)})"
        lines = [
            f"{head}, {self.parameters:,} LoRA parameters (from {self.parameters_in:,}), "
            f"{100 * self.kept:.2f}% of ‖ΔW‖² kept" + (f"; {len(self.copied)} tensors copied" if self.copied else "")
        ]
        ranks = sorted({(m.rank_in, m.rank) for m in self.modules})
        lines.append("  ranks (in -> out): " + ", ".join(f"{a}->{b}" for a, b in ranks[:12]))
        return "\n".join(lines)


def _check(adapter: LoraAdapter, *, combining: bool) -> None:
    cfg = adapter.config
    found = cfg.unsupported()
    if any("magnitude" in m.keys for m in adapter.modules.values()):
        found.append("DoRA (its magnitude depends on the base weights, not on the factors)")
    if any("B_bias" in m.keys for m in adapter.modules.values()):
        found.append("lora_bias (a trained bias is not low-rank)")
    if cfg.target_parameters:
        found.append("target_parameters (stacked MoE experts: E·r rows per module)")
    if adapter.token_deltas:
        found.append("trainable tokens")
    if combining and adapter.replacements:
        found.append(f"modules_to_save / trained biases ({', '.join(sorted(adapter.replacements)[:3])}): whole tensors")
    if found:
        verb = "combined" if combining else "resized"
        raise UnsupportedError(f"{adapter.path}: cannot be {verb} as low-rank factors: {'; '.join(found)}")


def _matrix(t: torch.Tensor, kind: str, role: str) -> torch.Tensor:
    if kind == "conv":
        if role == "B" and t.shape[2:] != (1, 1):
            raise UnsupportedError(f"a conv lora_B with a {list(t.shape[2:])} kernel is not a matrix product")
        return t.reshape(t.shape[0], -1)
    return t


def _plan(adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> tuple[list[ModuleOp], list[CopyOp]]:
    names: dict[str, list[tuple[int, LoraModule]]] = {}
    for i, adapter in enumerate(adapters):
        for name, module in adapter.modules.items():
            names.setdefault(name, []).append((i, module))
    ops: list[ModuleOp] = []
    for name, found in names.items():
        first_i, first = found[0]
        info_of = adapters[first_i].checkpoint.info
        a_role, b_role = ("emb_A", "emb_B") if first.kind == "embedding" else ("A", "B")
        a_shape, b_shape = info_of(first.keys[a_role]).shape, info_of(first.keys[b_role]).shape
        terms, ranks, nbytes = [], [], 0
        for i, m in found:
            ia, ib = adapters[i].checkpoint.info(m.keys[a_role]), adapters[i].checkpoint.info(m.keys[b_role])
            if m.kind != first.kind or ia.shape[1:] != a_shape[1:] or ib.shape[0] != b_shape[0]:
                raise IncompatibleError(
                    f"{adapters[i].path}: module {name!r} is {m.kind} {list(ib.shape)} x {list(ia.shape)}, but "
                    f"{adapters[first_i].path} has it {first.kind} {list(b_shape)} x {list(a_shape)}: "
                    "not the same base model"
                )
            terms.append((Ref(i, m.keys[a_role]), Ref(i, m.keys[b_role]), weights[i] * m.scale))
            ranks.append(ia.shape[0])
            nbytes += ia.nbytes + ib.nbytes
        keys = first.keys[a_role], first.keys[b_role]
        ops.append(ModuleOp(name, first.kind, tuple(terms), *keys, a_shape, b_shape, tuple(ranks), nbytes))
    copies: list[CopyOp] = []
    for i, adapter in enumerate(adapters):
        for key in [*adapter.replacements.values(), *adapter.base_weights.values()]:
            info = adapter.checkpoint.info(key)
            if key not in {c.name for c in copies}:
                copies.append(CopyOp(key, Ref(i, key), TensorSpec(key, info.dtype, info.shape)))
    return ops, copies


def _stacked(op: ModuleOp, tensors: Mapping[Ref, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of Σ factor·B A: B's columns and A's rows stacked, in float32."""
    b = torch.cat([_matrix(tensors[rb], op.kind, "B").to(torch.float32) * f for _, rb, f in op.terms], dim=1)
    a = torch.cat([_matrix(tensors[ra], op.kind, "A").to(torch.float32) for ra, _, _ in op.terms], dim=0)
    return b, a


def _spectrum(op: ModuleOp | CopyOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device) -> Outcome[Any]:
    if isinstance(op, CopyOp):
        return Outcome([], None)
    b, a = _stacked(op, tensors)
    return Outcome([], product_svd(b.to(device), a.to(device))[1].cpu())


def _factors(
    op: ModuleOp | CopyOp,
    tensors: Mapping[Ref, torch.Tensor],
    device: torch.device,
    *,
    exact: bool,
    ranks: Mapping[str, int],
    top: int,
    dtype: torch.dtype,
) -> Outcome[Any]:
    """A module's new factors at its chosen rank k, B scaled by k / top: with lora_alpha = top every consumer
    that scales by alpha / rank (PEFT with rank_pattern, llama.cpp, vLLM) gets exactly the change kept."""
    if isinstance(op, CopyOp):
        return Outcome([(op.name, tensors[op.src])], None)
    b, a = _stacked(op, tensors)
    u, s, vh = product_svd(b.to(device), a.to(device))
    energy = float(torch.sum(s**2))
    k = ranks[op.name]
    if exact:  # the stacked factors themselves: the weighted sum, exactly
        return Outcome(_shaped(op, b * (k / top), a, dtype), ModuleResult(op.name, op.rank, k, 1.0, energy))
    nb, na = split(u.cpu(), s.cpu(), vh.cpu(), k)
    kept = float(torch.sum(s[:k] ** 2)) / energy if energy else 1.0
    return Outcome(_shaped(op, nb * (k / top), na, dtype), ModuleResult(op.name, op.rank, k, kept, energy))


def _ranks(ops: Sequence[ModuleOp], spectra: Sequence[torch.Tensor] | None, target: Target, fixed: int) -> list[int]:
    """Each module's rank: all of it (exact), --rank, --energy per module, or --budget across modules; capped
    by --max-rank and by the matrix's own rank (the nonzero singular values)."""
    if target.exact:  # the stacked factors, all of them
        return [op.rank for op in ops]
    if spectra is None:
        caps = [min(op.rank, op.b_shape[0], math.prod(op.a_shape[1:])) for op in ops]
        return caps if target.rank is None else [max(1, min(target.rank, c)) for c in caps]
    caps = [max(1, min(int((s > s[0] * 1e-12).sum()) if len(s) else 1, target.max_rank or len(s))) for s in spectra]
    if target.energy is not None:
        return [
            max(1, min(rank_for_energy(s, float(torch.sum(s.double() ** 2)), target.energy), cap))
            for s, cap in zip(spectra, caps, strict=True)
        ]
    assert target.budget is not None
    try:
        return allocate(list(spectra), [op.cost for op in ops], target.budget - fixed, [1] * len(ops), caps)
    except ValueError:
        raise InvalidOptionError(
            f"--budget of {target.budget:,} parameters is less than rank 1 everywhere needs "
            f"({sum(op.cost for op in ops) + fixed:,})"
        ) from None


def _shaped(op: ModuleOp, b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    k = a.shape[0]
    a_out = a.reshape(k, *op.a_shape[1:])
    b_out = b.reshape(op.b_shape[0], k, *op.b_shape[2:])
    return [(op.a_key, a_out.to(dtype).contiguous()), (op.b_key, b_out.to(dtype).contiguous())]


def _config(
    adapters: Sequence[LoraAdapter], results: Sequence[ModuleResult], top: int, combining: bool
) -> dict[str, Any]:
    """The first adapter's config with r = lora_alpha = the largest rank kept, the others in rank_pattern
    (their scale top / k is folded out of B), no alpha_pattern and no rsLoRA."""
    raw = dict(adapters[0].config.raw)
    raw.update(r=top, lora_alpha=top, use_rslora=False, alpha_pattern={})
    raw["rank_pattern"] = {re.escape(m.name): m.rank for m in results if m.rank != top}  # PEFT matches regexes
    if combining and any(a.config.raw.get("target_modules") != raw.get("target_modules") for a in adapters):
        raw["target_modules"] = sorted(m.name for m in results)
        raw.pop("layers_to_transform", None)
        raw.pop("layers_pattern", None)
    return raw


def resize(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    budget: str | int | None = None,
    budget_params: int | None = None,
    max_rank: int | None = None,
    for_: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ResizeReport:
    """An adapter at a lower rank: per module the best rank-k factors of its own B A (Eckart–Young),
    found by QR of B and Aᵀ and the SVD of the small core, never forming the dense ΔW.

    Args:
        adapter: a PEFT adapter folder (or Hub id).
        out: the new adapter folder (None with ``dry_run``).
        rank, energy, budget, budget_params: one of: a rank for every module; per module the smallest rank
            keeping this share of ‖ΔW‖²; a size ("15MB", in the adapter's dtype) or a number of parameters
            for all LoRA factors together, spent where it removes the most squared error.
        max_rank: a cap per module.
        for_: "vllm" or "llama.cpp": make (or refuse by name) what that consumer needs: one alpha, scales in B
            (always), ranks within vLLM's 512, no whole tensors it refuses.
        device, overwrite, dry_run, progress: as for :func:`merge`.

    Returns:
        A ResizeReport: per module the rank in and out and the share of ‖ΔW‖² kept.

    Raises:
        InvalidOptionError: options that contradict each other or are out of range.
        UnsupportedError: DoRA, lora_bias, target_parameters, trainable tokens, variants.
    """
    return _run(
        [adapter],
        None,
        out,
        dict(rank=rank, energy=energy, budget=budget, budget_params=budget_params, max_rank=max_rank),
        for_=for_,
        device=device,
        overwrite=overwrite,
        dry_run=dry_run,
        progress=progress,
        combining=False,
    )


def combine(
    adapters: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None,
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    budget: str | int | None = None,
    budget_params: int | None = None,
    max_rank: int | None = None,
    for_: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ResizeReport:
    """One adapter for Σ wᵢ·ΔWᵢ: exact at rank Σ rᵢ (the factors stacked), or truncated optimally by the
    same QR + small-SVD route as :func:`resize` (PEFT's add_weighted_adapter "svd" forms each dense ΔW).

    Args:
        adapters: PEFT adapter folders of the same base model.
        weights: one per adapter (default 1.0 each).
        out, rank, energy, budget, budget_params, max_rank, for_, device, overwrite, dry_run, progress: as for
            :func:`resize` (no target: exact).

    Returns:
        A ResizeReport.

    Raises:
        InvalidOptionError, UnsupportedError: as for :func:`resize`; modules_to_save is refused too.
        IncompatibleError: a module the adapters hold with different shapes.
    """
    return _run(
        list(adapters),
        weights,
        out,
        dict(rank=rank, energy=energy, budget=budget, budget_params=budget_params, max_rank=max_rank),
        for_=for_,
        device=device,
        overwrite=overwrite,
        dry_run=dry_run,
        progress=progress,
        combining=True,
    )


def _run(
    paths: Sequence[str | os.PathLike[str]],
    weights: Sequence[float] | None,
    out: str | os.PathLike[str] | None,
    options: dict[str, Any],
    *,
    device: str,
    overwrite: bool,
    dry_run: bool,
    progress: Progress | None,
    combining: bool,
    for_: str | None = None,
) -> ResizeReport:
    command = "combine" if combining else "resize"
    if for_ not in (None, "vllm", "llama.cpp"):
        raise InvalidOptionError(f"unknown --for {for_!r}: choose vllm or llama.cpp")
    if combining and len(paths) < 2:
        raise InvalidOptionError("combine takes two adapters or more (resize takes one)")
    chosen = tuple(weights) if weights else (1.0,) * len(paths)
    if len(chosen) != len(paths):
        raise InvalidOptionError(f"{len(chosen)} weights for {len(paths)} adapters: give one --weight per adapter")
    check_weights(chosen)
    sources = prepare(
        [Input(p, "ADAPTER", "adapter") for p in paths], out, command=command, overwrite=overwrite, device=device
    )
    adapters = [load_adapter(s.path) for s in sources]
    try:
        for adapter in adapters:
            _check(adapter, combining=combining)
        ops, copies = _plan(adapters, chosen)
        if not ops:
            raise UnsupportedError(f"{sources[0].label}: no LoRA modules to {command}")
        if for_:  # a saved W0 (base_layer.weight) is a copy of the base: neither consumer wants it
            saved = {key for adapter in adapters for key in adapter.base_weights.values()}
            copies = [c for c in copies if c.name not in saved]
        refused = [c.name for c in copies if for_ == "llama.cpp" or not c.name.endswith(VLLM_WHOLE)] if for_ else []
        if refused:
            raise UnsupportedError(
                f"{sources[0].label}: --for {for_}: whole tensors it does not load ({', '.join(refused[:3])}); "
                "leave them out of the adapter"
            )
        dtype = adapters[0].checkpoint.info(ops[0].a_key).dtype
        target = Target.parse(**options, itemsize=itemsize(dtype), required=not combining)
        inputs = [a.checkpoint for a in adapters]
        parameters_in = sum(op.rank * op.cost for op in ops)
        labels = [s.label for s in sources]
        if dry_run:
            results = [ModuleResult(op.name, op.rank, op.rank, 1.0, 0.0) for op in ops]
            where = None if out is None else str(out)
            return ResizeReport(
                where, labels, list(chosen), _method(target, for_), results, parameters_in, 0, 1.0, True
            )
        if out is None:
            raise InvalidOptionError("an output folder is needed (or use dry_run)")
        fixed = sum(math.prod(c.spec.shape) for c in copies)  # whole tensors are charged to a budget too
        spectra = None
        if target.energy is not None or target.budget is not None:  # a first pass: each module's spectrum
            spectra = list(run(ops, inputs, Discard(), compute=_spectrum, device=device).infos)
        ranks = {op.name: k for op, k in zip(ops, _ranks(ops, spectra, target, fixed), strict=True)}
        top = max(ranks.values())
        if for_ == "vllm" and top > VLLM_MAX_RANK:
            raise InvalidOptionError(
                f"--for vllm: rank {top} is more than vLLM's largest max_lora_rank ({VLLM_MAX_RANK}): "
                f"add --max-rank {VLLM_MAX_RANK} (the best factors of that rank) or a lower --rank"
            )
        spool = SpoolWriter(out, prefix="adapter_model", overwrite=overwrite)
        try:
            every: list[ModuleOp | CopyOp] = [*ops, *copies]
            stats = run(
                every,
                inputs,
                spool,
                compute=partial(_factors, exact=target.exact, ranks=ranks, top=top, dtype=dtype),
                device=device,
                progress=progress,
            )
            results = [i for i in stats.infos if isinstance(i, ModuleResult)]
            total = sum(r.energy for r in results)
            report = ResizeReport(
                str(out),
                labels,
                list(chosen),
                _method(target, for_),
                results,
                parameters_in,
                sum(r.rank * op.cost for r, op in zip(results, ops, strict=True)),
                sum(r.kept * r.energy for r in results) / total if total else 1.0,
                copied=[c.name for c in copies],
            )
            spool.add_file(CONFIG_NAME, config_bytes(_config(adapters, results, top, combining)))
            spool.add_file("resize_report.json", config_bytes(report.to_dict()))
            spool.add_file(CARD_NAME, _card(report, command, Path(out).name, adapters[0].config.base_model))
            spool.commit()
            return report
        except BaseException:
            spool.abort()
            raise
    finally:
        for adapter in adapters:
            adapter.close()


def _method(target: Target, for_: str | None = None) -> dict[str, Any]:
    found = {k: v for k, v in vars(target).items() if v is not None} or {"exact": True}
    return found | ({"for": for_} if for_ else {})


def _card(report: ResizeReport, command: str, title: str, base: str | None) -> str:
    what = (
        f"The weighted sum of {', '.join(f'`{a}` × {w:g}' for a, w in zip(report.inputs, report.weights, strict=True))}"
        if command == "combine"
        else f"`{report.inputs[0]}` at a lower rank"
    )
    lines = [
        f"{what}: {report.parameters:,} LoRA parameters, {100 * report.kept:.2f}% of ‖ΔW‖² kept (method: "
        f"{report.method}).",
    ]
    return model_card(kind="adapter", base=base, title=title, lines=lines)
