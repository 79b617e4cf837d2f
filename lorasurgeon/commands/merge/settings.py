"""MergeSettings: merge, unmerge and convert's options, validated once, carried to the plan, the engine and the card."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast, get_args

from ...engine.devices import check_cluster, devices_of
from ...errors import InvalidOptionError
from ...io.dtypes import torch_dtype, torch_name
from .._inputs import adapter_weights, output_dtype, parse_shard_size

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch

Form = Literal["merged", "augmented"]  # the plain architecture, or with the LoRA layers inside
Target = Literal["merged", "adapter"]  # what convert turns an augmented checkpoint into
Quantize = Literal["keep"]  # a quantized base's result in the base's own format


Cluster = Literal["ray"]


@dataclass(frozen=True)
class MergeSettings:
    """How to merge. Make it with :meth:`parse`, which checks every option by name."""

    weights: tuple[float, ...]  # one per adapter
    form: Form = "merged"
    dtype_name: str | None = None  # safetensors' name; None: each tensor keeps its dtype
    device: str = "cpu"
    max_shard_size: int | None = None  # None: keep the base's layout
    allow_nonfinite: bool = False
    unmerge: bool = False
    quantize: Quantize | None = None  # None: keep for a quantized base unless a dtype is given
    workers: int | None = None  # tensors computed at once on the CPU; None: compute_workers()
    cluster: Cluster | None = None  # "ray": one Ray task per result shard (engine.cluster)

    @classmethod
    def parse(
        cls,
        *,
        adapters: int,
        weights: Sequence[float] | None = None,
        form: str = "merged",
        dtype: str | torch.dtype | None = "auto",
        device: str = "cpu",
        max_shard_size: str | int | None = None,
        allow_nonfinite: bool = False,
        unmerge: bool = False,
        quantize: str | None = None,
        workers: int | None = None,
        cluster: str | None = None,
    ) -> MergeSettings:
        """Validated settings for ``adapters`` adapters (InvalidOptionError naming the option otherwise)."""
        if form not in get_args(Form):
            raise InvalidOptionError(f"unknown form {form!r}: choose one of {', '.join(get_args(Form))}")
        if adapters < 1:
            raise InvalidOptionError("give at least one adapter")
        chosen = adapter_weights(weights, adapters)
        if form == "augmented" and (adapters != 1 or chosen[0] != 1.0 or unmerge):
            raise InvalidOptionError("the augmented form holds exactly one adapter, with weight 1")
        if quantize not in (None, *get_args(Quantize)):
            raise InvalidOptionError(f"unknown --quantize {quantize!r}: choose keep (or --dtype for a plain result)")
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise InvalidOptionError(f"--workers must be at least 1, got {workers}")
        if workers is not None and workers > 1 and device != "cpu":
            raise InvalidOptionError(f"--workers is for the CPU: on {device} one tensor per GPU is computed at a time")
        check_cluster(cluster, device)
        out_dtype = output_dtype(dtype)
        if quantize == "keep" and out_dtype is not None:
            raise InvalidOptionError(
                "--quantize keep and --dtype contradict each other: keep writes the base's quantized format, "
                "--dtype a plain dequantized result; give one"
            )
        return cls(
            chosen,
            cast(Form, form),
            out_dtype,
            device,
            parse_shard_size(max_shard_size),
            allow_nonfinite,
            unmerge,
            cast(Quantize | None, quantize),
            workers,
            cast(Cluster | None, cluster),
        )

    def compute_workers(self) -> tuple[int, int | None]:
        """(ops computed at once, torch threads each) for the engine: on the CPU one op per core the reader
        and writer leave (at most 8), each single-threaded (the row-block kernel loses more to thread
        hand-offs than it gains: docs/benchmarks.md); on GPUs one op on each, torch's threads untouched."""
        if self.device != "cpu":
            return len(devices_of(self.device)), None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return self.workers or max(1, min(8, cores - 1)), 1

    @property
    def command(self) -> Literal["merge", "unmerge"]:
        return "unmerge" if self.unmerge else "merge"

    @property
    def dtype(self) -> torch.dtype | None:
        """The --dtype as a torch dtype (imports torch), None for each tensor's own."""
        return None if self.dtype_name is None else torch_dtype(self.dtype_name)

    @property
    def dtype_words(self) -> str:
        return torch_name(self.dtype_name).removeprefix("torch.") if self.dtype_name is not None else "as the base"
