"""resize --calibration and combine --calibration: each module's new factors best on the calibration samples, still
without forming the dense ΔW.

For a module's change B·A (the adapters' factors stacked), its inputs' moment Gc = Lc Lcᵀ and its output gradients'
Gr = Lr Lrᵀ (+ λI, measured by running the base, or the base with the adapters merged in, layer by layer and back:
``calibration``), the best rank-k factors on the data are the truncated SVD of (Lrᵀ·B)·(A·Lc) -- a product of thin
factors, by QR and a small core as resize does -- mapped back (``ops.whitened``). σⱼ², relative to the module's
output weighed alike (W the base's weight), are each component's gain: what --energy and --budget spend by. The
plain SVD's error at the same rank is measured in the same weighted norm (``errors_by_rank`` on the factors),
reported beside it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ...adapter.weights import LoraAdapter
from ...calibration import Calibration, Measured, embedding_moments, linear_moments, measure, whitening_of
from ...engine.plan import Ref
from ...errors import UnsupportedError
from ...io.checkpoint import Checkpoint
from ...io.sidecar import read_config
from ...io.spool import SpoolWriter
from ...names import ModelNames, model_names
from ...ops.lowrank import product_svd
from ...ops.whitened import Whitening, errors_by_rank
from .plan import ModuleOp

if TYPE_CHECKING:
    import torch

    from ...engine.execute import Progress
else:
    from ..._lazy import torch


@dataclasses.dataclass(frozen=True)
class WhitenedSvd:
    """A module's change in its whitened space: B·A·L = U·S·Vh (float64), its output E‖W·x‖², the change of
    variables, and the plain SVD's output error left at every rank k = 0..rank."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    signal: float
    whitening: Whitening
    plain: torch.Tensor

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-k factors, mapped back: (B, A) float64."""
        root = self.s[:k].sqrt()
        a, b = self.whitening.factors(root[:, None] * self.vh[:k], self.u[:, :k] * root)
        return b, a

    def errors(self, k: int) -> tuple[float, float, float]:
        """Output error before, after the rank-k factors, and after the plain SVD's (relative to E‖W·x‖²)."""
        s2 = self.s**2
        return float(s2.sum()) / self.signal, float(s2[k:].sum()) / self.signal, float(self.plain[k]) / self.signal


def whitened_svd(op: ModuleOp, b: torch.Tensor, a: torch.Tensor, tensors: Mapping[Ref, torch.Tensor]) -> WhitenedSvd:
    """The stacked factors (``b``, ``a``: B·A is the module's change, PEFT's orientation) in the op's whitened space."""
    assert op.moments is not None and op.weight is not None
    whitening = whitening_of(op.moments, tensors, b.device)
    left, right = whitening.left(b), whitening.right(a)
    u, s, vh = product_svd(left, right)
    w = tensors[op.weight].to(device=b.device, dtype=torch.float64)
    w = w.T if op.kind == "embedding" else w.reshape(w.shape[0], -1)  # (vocab, hidden) as PEFT's (hidden, vocab)
    signal = float(whitening.whiten(w).square().sum()) or 1.0
    pu, ps, pvh = product_svd(b.to(torch.float64), a.to(torch.float64))
    plain = errors_by_rank((left, right), whitening.left(pu * ps), whitening.right(pvh))  # the plain SVD's, per rank
    plain = torch.cat([plain, plain.new_zeros(max(0, len(s) + 1 - len(plain)))])
    return WhitenedSvd(u, s, vh, signal, whitening, plain)


def measure_for(
    calibration: Calibration,
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    base: Checkpoint,
    spool: SpoolWriter,
    *,
    device: str,
    progress: Progress | None,
) -> tuple[Measured, ModelNames]:
    """The base -- or, by default, the base with the adapters merged in (their weighted sum: what the result
    approximates) -- run on the samples layer by layer; its moments spooled."""
    from ..convert.to_lora import MergedView
    from ..merge.ops import TensorOp
    from ..merge.plan import plan_merge

    config = read_config(base)
    names = model_names(base.names(), config)
    model, whose = base, "the base's"
    if calibration.model == "finetuned":
        ops, _ = plan_merge(base, list(adapters), list(weights), names, dtype="F32", unmerge=False)
        changed = {op.name: op for op in ops if isinstance(op, TensorOp) and op.action != "copy"}
        model = MergedView(base, [base, *(a.checkpoint for a in adapters)], changed)
        whose = "the merged model's (the base with the adapters)"
    folder = base.root if base.root.is_dir() else base.root.parent
    measured = measure(
        calibration, model, names, config, (folder,), spool, whose=whose, device=device, progress=progress
    )
    return measured, names


def attach(ops: Sequence[ModuleOp], measured: Measured, names: ModelNames, n: int) -> list[ModuleOp]:
    """The ops told where their moments (input ``n``, after the n adapters: the spool) and base weights (input
    n + 1: the base) are; a module the run does not reach (a convolution) refused by name -- its factors would not
    be on the data."""
    gathered = measured.gathered
    out = []
    for op in ops:
        weight = f"{op.name}.weight"
        key = names.file_key(names.tied.get(weight, weight)) if weight not in names.file_of else names.file_key(weight)
        if key is None:
            raise UnsupportedError(f"--calibration: module {op.name!r} has no weight in the base to measure it by")
        found = linear_moments(gathered, op.name, n) if op.kind == "linear" else None
        if found is None and op.kind == "embedding" and op.a_shape[1] == gathered.vocab:
            found = embedding_moments(gathered, n)
        if found is None:
            raise UnsupportedError(
                f"--calibration: module {op.name!r} ({op.kind}) is not reached by running the model layer by layer: "
                "resize it without --calibration"
            )
        out.append(dataclasses.replace(op, moments=found, weight=Ref(n + 1, key)))
    return out


def describe(measured: Measured) -> dict[str, Any]:
    """What the report says of the calibration run."""
    g = measured.gathered
    return {"samples": measured.source, "activations": measured.whose, "layers": g.layers, "tokens": g.tokens}
