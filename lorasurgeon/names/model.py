"""ModelNames: how a model's tensors are named in memory and in its files, and which are tied.

A PEFT adapter names modules as they are in memory, under the transformers version that trained
it; a checkpoint on disk keeps the names (and the per-expert tensors) its writer used. transformers
5 renames and fuses weights on load (``conversion_mapping.py``), and writes the old layout back when
it saves. Every command asks this one object which file tensor an in-memory name is, which
tensors share one (tied embeddings, under whatever names the model uses), which is the output head,
and which PEFT task type the model's class needs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..ops.lora import LayerName


@dataclass(frozen=True)
class FusedExperts:
    """One fused MoE parameter in memory (``experts.gate_up_proj`` [E, out, in]) made on load from
    per-expert tensors in the files: ``parts[p][e]`` is the file key of part p (gate, up) of expert e,
    stacked along the first axis and the parts concatenated along ``axis`` (1: the out rows)."""

    parts: tuple[tuple[str, ...], ...]
    axis: int = 1

    @property
    def experts(self) -> int:
        return len(self.parts[0])


@dataclass(frozen=True)
class ModelNames:
    """Which tensor is which. All names are in-memory names unless they say file."""

    file_of: Mapping[str, str]  # in-memory name -> file key, for every tensor the files hold whole
    tied: Mapping[str, str]  # in-memory tied target -> in-memory source, where the model ties them
    head: str | None  # the output head's weight (lm_head.weight, proj_out.weight, cls.predictions.decoder.weight)
    embedding: str | None  # the input embedding's weight
    fused: Mapping[str, FusedExperts] = field(default_factory=dict)  # in-memory fused parameter -> its file parts
    model_class: str | None = None  # the transformers class the config names
    task_type: str | None = None  # PEFT's task_type for that class (None: PEFT's plain PeftModel)
    source: str = "built-in table"  # where these answers came from
    saved_as: Mapping[str, str] = field(default_factory=dict)  # in-memory name -> its name when saved (the files')
    # in-memory stacked expert parameters stored (E, in, out) rather than (E, out, in) (GPT-OSS: is_transposed)
    transposed: frozenset[str] = frozenset()
    # in-memory module -> the kind of layer PEFT would wrap it as: linear, conv1d (GPT-2's), embedding, conv
    # (ops.lora's LayerName: one vocabulary); from transformers' own modules, or the built-in table's names
    layers: Mapping[str, LayerName] = field(default_factory=dict)
    # in-memory module -> its stacked (3-D) expert parameters in the order the module registers them (PEFT
    # nests one ParamWrapper per targeted parameter in that order: the first is the innermost)
    stacked: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    model_type: str | None = None  # config.json's model_type these names were made for (None: it names none)
    # in-memory tensor -> (file key, start, stop, of): a block of rows of a fused file tensor, rows
    # [rows·start/of, rows·stop/of) (OpenCLIP's in_proj_weight holds q, k, v: 0-1, 1-2, 2-3 of 3), which a LoRA
    # on the in-memory module changes alone
    row_blocks: Mapping[str, tuple[str, int, int, int]] = field(default_factory=dict)

    def file_key(self, name: str) -> str | None:
        """The file key of an in-memory tensor name the files hold whole (None if they do not)."""
        return self.file_of.get(name)

    def memory_name(self, file_key: str) -> str:
        """The in-memory name of a file tensor (itself, when nothing renames it)."""
        return self._memory_of.get(file_key, file_key)

    def file_name_for(self, name: str) -> str:
        """The name an in-memory tensor gets in files of the model's own convention: for one the files
        do not hold (an untied head; GPT-NeoX's lm_head is embed_out on disk), or when converting
        in-memory names (the augmented form) back."""
        return self.saved_as.get(name, name)

    def layer_of(self, module: str, ndim: int) -> LayerName | None:
        """The kind of layer PEFT would wrap in-memory ``module`` as, its weight having ``ndim`` axes (None: none
        PEFT wraps). A 4-D weight is a Conv2d's: the built-in table knows names, not shapes (transformers' answer
        is never a Linear, Conv1D or Embedding with a 4-D weight)."""
        kind = self.layers.get(module)
        return "conv" if kind is not None and ndim == 4 else kind

    def parameters_of(self, module: str) -> list[str]:
        """The in-memory names of a module's own parameters (held whole by the files, or fused from them)."""
        return sorted(n for n in (*self.file_of, *self.fused) if n.rpartition(".")[0] == module)

    @functools.cached_property  # asked once per module by a plan: built once (the fields never change)
    def _memory_of(self) -> dict[str, str]:
        return {file: memory for memory, file in self.file_of.items()}

    def tied_absent(self, stored: Mapping[str, object] | set[str]) -> dict[str, str]:
        """Tied targets the files do not hold -> their in-memory source: tensors that are views of another."""
        return {t: s for t, s in self.tied.items() if t not in self.file_of and s in self.file_of and t not in stored}
