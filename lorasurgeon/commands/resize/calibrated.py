"""resize --calibration and combine --calibration: each module's new factors best on the calibration inputs, still
without forming the dense ΔW.

For a module's change B·A (the adapters' factors stacked) and its inputs' moment G = L Lᵀ (+ λI, measured by running
the base, or the base with the adapters merged in, layer by layer: ``calibration``), the best rank-k factors on the
data are the truncated SVD of B·(A·L) -- a product of thin factors, by QR and a small core as resize does -- with
A mapped back by L⁻¹ (``ops.whitened``). σⱼ², relative to the module's output E‖W·x‖² (W the base's weight), are each
component's gain in output error: what --energy and --budget spend by. The plain SVD's output error at the same rank
is Σ_{j≥k} sⱼ²·‖vⱼᵀ·L‖² (the product's own singular triplets), reported beside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ...adapter.weights import LoraAdapter
from ...calibration import Calibration, Measured, Moments, measure, whitening_of
from ...calibration.layerwise import TOKENS
from ...engine.plan import Ref
from ...errors import UnsupportedError
from ...io.checkpoint import Checkpoint
from ...io.sidecar import read_config
from ...io.spool import SpoolWriter
from ...names import ModelNames, model_names
from ...ops.lowrank import product_svd
from ...ops.whitened import Whitening
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
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    u, s, vh = product_svd(b64, whitening.whiten(a64))
    w = tensors[op.weight].to(device=b.device, dtype=torch.float64)
    w = w.T if op.kind == "embedding" else w.reshape(w.shape[0], -1)  # (vocab, hidden) as PEFT's (hidden, vocab)
    signal = float(whitening.whiten(w).square().sum()) or 1.0
    _, ps, pvh = product_svd(b64, a64)
    tail = (ps**2) * whitening.whiten(pvh).square().sum(1)  # sⱼ²·‖vⱼᵀ·L‖²: each plain component's output error
    zero = torch.zeros(1, dtype=torch.float64, device=tail.device)
    plain = torch.cat([tail.flip(0).cumsum(0).flip(0), zero])
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
    moments, vocab = measured.gathered.moments, measured.gathered.vocab
    out = []
    for op in ops:
        weight = f"{op.name}.weight"
        key = names.file_key(names.tied.get(weight, weight)) if weight not in names.file_of else names.file_key(weight)
        if key is None:
            raise UnsupportedError(f"--calibration: module {op.name!r} has no weight in the base to measure it by")
        if op.kind == "linear" and op.name in moments:
            found = Moments(inputs=Ref(n, moments[op.name]))
        elif op.kind == "embedding" and op.a_shape[1] == vocab:
            found = Moments(tokens=Ref(n, TOKENS))
        else:
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
