"""convert ADAPTER --to lora --base BASE (--rank | --energy | --budget): the best LoRA of the change an adapter of
any PEFT tuner makes (LoHa, LoKr, IA³, OFT, VeRA, ... or LoRA itself), offline and streamed.

The adapter's merge into the base is planned as merge plans it (``merge.plan``); the merged model is then a
checkpoint view (:class:`MergedView`) whose changed tensors are computed, in float32, when read, and extract
compares it with the base tensor by tensor -- the truncated SVD of each module's exact ΔW (Eckart–Young: the
best factors of each rank), the budget, the report and the adapter as extract makes them. A multiplicative tuner
(IA³, OFT) changes W0·(…), so its ΔW depends on the base's values: the base is always needed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from ...errors import UnsupportedError
from ...formats.detect import quant_config
from ...io.checkpoint import Checkpoint, TensorInfo
from ...io.sidecar import read_config
from ...names import model_names
from .._inputs import Input, Output, adapters_of, open_inputs
from .._timing import timed
from ..extract import dry_report, plan_pair, write_adapter
from ..extract.finish import Origin
from ..extract.report import ExtractReport
from ..extract.settings import ExtractSettings
from ..merge.compute import compute_merge
from ..merge.ops import TensorOp
from ..merge.plan import check_supported, plan_merge

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


class MergedView(Checkpoint):
    """The base with one adapter merged in, as a checkpoint: the base's tensors, each one the merge changes
    computed when read -- in float32, so that the change extract measures is the adapter's, not a rounding's."""

    def __init__(self, base: Checkpoint, inputs: Sequence[Checkpoint], ops: Mapping[str, TensorOp]):
        # a computed tensor has no bytes on disk (offset None): nothing copies the base's bytes in its place
        infos = [dataclasses.replace(i, dtype_name="F32", offset=None) if i.name in ops else i for i in base.infos()]
        super().__init__(base.root, base.format, list(base.files), infos, dict(base.metadata), base.index_file)
        self._inputs, self._ops = inputs, ops

    def read_info(self, info: TensorInfo, alloc: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        op = self._ops.get(info.name)
        if op is None:
            return super().read_info(info, alloc)
        tensors = {r: self._inputs[r.source].read(r.key) for r in op.refs()}
        ((_, merged),) = compute_merge(op, tensors, torch.device("cpu")).outputs
        return merged


@timed
def to_lora(
    adapter: str | os.PathLike[str], base: str | os.PathLike[str], out: Output, settings: ExtractSettings
) -> ExtractReport:
    """The LoRA of the change ``adapter`` makes to ``base``, sized and written as ``settings`` and ``out`` say."""
    inputs = [Input(adapter, "INPUT", "adapter"), Input(base, "BASE", "model")]  # the command line's order
    with open_inputs(
        inputs, out.path, command="convert", overwrite=out.overwrite, device=settings.device, in_place=out.in_place
    ) as opened:  # each checkpoint opened once, by the kind check
        base_ckpt = opened[1].checkpoint
        assert base_ckpt is not None  # the base's kind is checked, so it is open
        (tuned,) = adapters_of(opened[:1])
        try:
            config = read_config(base_ckpt)
            if quant_config(config) is not None:
                raise UnsupportedError(
                    f"{opened[1].source.label}: a quantized base: --to lora reads a plain one (convert it to a --dtype)"
                )
            check_supported(tuned, unmerge=False, weight=1.0)
            names = model_names(base_ckpt.names(), config)
            ops, _ = plan_merge(base_ckpt, [tuned], [1.0], names, dtype="F32", unmerge=False)
            changed = {op.name: op for op in ops if isinstance(op, TensorOp) and op.action != "copy"}
            view = MergedView(base_ckpt, [base_ckpt, tuned.checkpoint], changed)
            labels = (opened[1].source.label, opened[0].source.label)
            command = ("lorasurgeon", "convert", labels[1], "--to=lora", f"--base={labels[0]}")
            origin = Origin(labels[0], f"{labels[1]} merged into it", str(out.path), command)
            planned = plan_pair(base_ckpt, view, origin, settings)
            planned = dataclasses.replace(planned, ops=[o for o in planned.ops if o.tuned.key in changed])
            if out.dry_run:
                return dry_report(planned, origin, settings)
            where = out.where()
            return write_adapter(planned, where, origin, settings, overwrite=out.overwrite, progress=out.progress)
        finally:
            tuned.close()
