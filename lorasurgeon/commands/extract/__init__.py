"""extract: a fine-tune minus its base becomes a PEFT LoRA adapter, streamed tensor by tensor."""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path

import torch

from ...engine.execute import Progress, run
from ...errors import InvalidOptionError as OptionError, LorasurgeonError
from ...hub.cards import CARD_NAME, extract_card
from ...hub.source import resolve_source
from ...io.checkpoint import open_checkpoint
from ...io.dtypes import parse_dtype
from ...io.sidecar import is_tied, read_config
from ...io.spool import SpoolWriter
from ...ops.lowrank import SOLVERS
from .._inputs import check_device, check_output, expect_kind, refuse_quantized
from .compute import compute_extract
from .finish import ExtractReport, finish_adapter
from .plan import ExtractOptions, plan_extract


def _options(rank, energy, max_rank, solver, dtype, include, exclude, embeddings, extras):
    if (rank is None) == (energy is None):
        raise OptionError("give exactly one of --rank N or --energy F")
    if rank is not None and rank < 1:
        raise OptionError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise OptionError(f"--energy must be in (0, 1], got {energy}")
    if max_rank is not None and energy is None:
        raise OptionError(f"--max-rank caps the ranks --energy chooses; with --rank {rank} every module gets rank "
                          f"{rank} (or its matrix's own, if smaller): drop --max-rank, or use --energy")
    if max_rank is not None and max_rank < 1:
        raise OptionError(f"--max-rank must be at least 1, got {max_rank}")
    if solver not in SOLVERS:
        raise OptionError(f"unknown solver {solver!r}: choose {', '.join(SOLVERS)}")
    if embeddings not in ("lowrank", "full", "skip") or extras not in ("full", "skip"):
        raise OptionError("--embeddings is lowrank|full|skip and --extras is full|skip")
    try:
        out_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        patterns = [re.compile(p) if p else None for p in (include, exclude)]
    except (ValueError, re.error) as exc:
        raise OptionError(str(exc)) from None
    if not out_dtype.is_floating_point:
        raise OptionError(f"--dtype must be a floating dtype, not {out_dtype}")
    return out_dtype, ExtractOptions(embeddings, extras, *patterns)


def extract(base: str | os.PathLike[str], finetuned: str | os.PathLike[str], out: str | os.PathLike[str] | None,
            *, rank: int | None = None, energy: float | None = None, max_rank: int | None = None,
            include: str | None = None, exclude: str | None = None, embeddings: str = "lowrank",
            extras: str = "full", solver: str = "auto", device: str = "cpu", seed: int = 0,
            dtype: str | torch.dtype = "float32", overwrite: bool = False, dry_run: bool = False,
            allow_nonfinite: bool = False, progress: Progress | None = None) -> ExtractReport:
    """Extract a PEFT LoRA adapter from ``finetuned`` − ``base`` by truncated SVD.

    Args:
        rank: a fixed rank for every module (capped by each matrix's own), or
        energy: per module, the smallest rank keeping this fraction of ‖ΔW‖² (capped by max_rank).
        include / exclude: regexes on tensor names (re.search) choosing what is considered.
        embeddings: embedding deltas as LoRA ("lowrank"), in full, or skipped.
        extras: changed norms, biases and other non-matrix tensors: stored in full, or skipped.
        solver: auto | randomized (block Krylov) | exact (full SVD); device: cpu or cuda.
        dtype: of the LoRA factors (full tensors keep the fine-tune's dtype).

    Returns:
        An ExtractReport (also written as extract_report.json in ``out``).
    """
    out_dtype, opts = _options(rank, energy, max_rank, solver, dtype, include, exclude, embeddings, extras)
    base_src, tuned_src = resolve_source(base), resolve_source(finetuned)
    base_path, tuned_path = base_src.path, tuned_src.path
    expect_kind(base_path, base_src.label, role="BASE", want="model", command="extract",
                others=[(tuned_path, tuned_src.label)])
    expect_kind(tuned_path, tuned_src.label, role="FINETUNED", want="model", command="extract")
    if base_path.resolve() == tuned_path.resolve():
        raise OptionError(f"{finetuned}: the base and the fine-tune are the same checkpoint")
    if out is not None:
        check_output(out, [base_path, tuned_path], overwrite=overwrite)
    check_device(device)
    with open_checkpoint(base_path) as b_ckpt, open_checkpoint(tuned_path) as t_ckpt:
        b_cfg, t_cfg = read_config(b_ckpt.folder), read_config(t_ckpt.folder)
        refuse_quantized(b_ckpt, b_cfg, role="the base model", command="extract")
        refuse_quantized(t_ckpt, t_cfg, role="the fine-tune", command="extract")
        ops, excluded = plan_extract(b_ckpt, t_ckpt, base_tied=is_tied(b_cfg), tuned_tied=is_tied(t_cfg),
                                     model_type=t_cfg.get("model_type") or b_cfg.get("model_type"), opts=opts)
        method = {"rank": rank, "energy": energy, "max_rank": max_rank, "solver": solver, "seed": seed,
                  "dtype": str(out_dtype).removeprefix("torch."), "embeddings": embeddings, "extras": extras}
        if dry_run:
            counts = {k: sum(o.kind == k for o in ops) for k in ("linear", "conv1d", "conv", "embedding", "bias", "full", "skip")}
            notes = [f"{len(ops)} tensors compared ({excluded} excluded): "
                     + ", ".join(f"{n} {k}" for k, n in counts.items() if n)] + [o.note for o in ops if o.note]
            return ExtractReport(None, base_src.label, tuned_src.label, method, [], [], {}, {}, notes, True)
        if out is None:
            raise OptionError("an output folder is needed (or use dry_run)")
        spool = SpoolWriter(out, prefix="adapter_model", overwrite=overwrite)
        try:
            compute = partial(compute_extract, rank=rank, energy=energy, max_rank=max_rank, solver=solver,
                              seed=seed, dtype=out_dtype, allow_nonfinite=allow_nonfinite)
            stats = run(ops, [b_ckpt, t_ckpt], spool, compute=compute, device=device, progress=progress)
            if not any(i.status in ("lowrank", "full", "bias") for i in stats.infos):
                raise LorasurgeonError(f"{finetuned}: no tensor differs from the base: there is nothing to extract")
            report = finish_adapter(spool, list(stats.infos), t_ckpt, out=str(out), base=base_src.label,
                                    finetuned=tuned_src.label, method=method, excluded=excluded,
                                    fixed_rank=rank, seconds=stats.seconds, dtype=out_dtype)
            spool.add_file(CARD_NAME, extract_card(title=Path(out).name, base=base_src.label,
                                                   finetuned=tuned_src.label, method=method,
                                                   modules=report.modules, totals=report.totals, full=report.full))
            spool.commit()
            return report
        except BaseException:
            spool.abort()
            raise
