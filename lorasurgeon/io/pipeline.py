"""A diffusers pipeline folder (``model_index.json`` and a folder per component) as one checkpoint.

A pipeline's weights are its components' (``unet/diffusion_pytorch_model.safetensors``,
``text_encoder/model.safetensors``, ``vae/...``), each a checkpoint of its own whose tensors are named as the
component's ``state_dict()`` names them. Opened as one, every tensor is called ``<component>.<its name>`` --
the names diffusers' own LoRA files use (``unet.down_blocks.0...to_q.lora_A.weight``,
``text_encoder.text_model...``) -- so a merge, a diff or an extraction reads a pipeline as it reads a model,
and a result is written back in the same layout: each tensor into its component's file, under its own name
there (:func:`component_of`), and every other file of the folder (configs, scheduler, tokenizer) copied.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import CorruptCheckpointError, InputNotFoundError
from .checkpoint import FOLDER_LAYOUTS, Checkpoint, TensorInfo, open_checkpoint
from .layout import Shard, TensorSpec, parse_size, plan_shards, shards_like
from .sidecar import read_json_object

PIPELINE_INDEX = "model_index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


class PipelineCheckpoint(Checkpoint):
    """A pipeline's components' tensors under ``<component>.<name>``; ``components`` maps each component with
    weights to its folder's checkpoint format and index file name (None: one file)."""

    config: dict[str, object] = {}  # no config.json of its own: each component keeps its own (copied)

    def __init__(self, root: Path, files: list[Path], infos: list[TensorInfo], components: dict[str, str | None]):
        super().__init__(root, "pipeline", files, infos, {})
        self.components = components


def is_pipeline(folder: Path) -> bool:
    """Whether ``folder`` is a diffusers pipeline folder (it holds model_index.json)."""
    return (folder / PIPELINE_INDEX).is_file()


def open_pipeline(root: Path) -> PipelineCheckpoint:
    """Every weight-holding component of the pipeline at ``root``, headers only, as one checkpoint.

    Raises:
        CorruptCheckpointError: a model_index.json that is not a JSON object, or a component's weights that
            cannot be read. InputNotFoundError: a pipeline with no component holding weights.
    """
    index = read_json_object(root / PIPELINE_INDEX, CorruptCheckpointError)
    files: list[Path] = []
    infos: list[TensorInfo] = []
    components: dict[str, str | None] = {}
    for name in sorted(index):
        folder = root / name
        if name.startswith("_") or not folder.is_dir() or not _holds_weights(folder):
            continue  # _class_name, a scheduler, a tokenizer, a component left out (null)
        with open_checkpoint(folder) as part:
            files += part.files
            infos += [dataclasses.replace(i, name=f"{name}.{i.name}", key=i.file_key) for i in part.infos()]
            components[name] = part.index_file.name if part.index_file is not None else None
    if not components:
        raise InputNotFoundError(f"{root}: a diffusers pipeline ({PIPELINE_INDEX}) with no component holding weights")
    return PipelineCheckpoint(root, files, infos, components)


def _holds_weights(folder: Path) -> bool:
    return any((folder / filename).is_file() for filename, _ in FOLDER_LAYOUTS)


def component_of(name: str) -> tuple[str, str]:
    """(component, its name there) of a pipeline tensor: ``unet.conv_in.weight`` -> ("unet", "conv_in.weight")."""
    component, _, inner = name.partition(".")
    return component, inner


def pipeline_files(root: Path) -> list[tuple[Path, str]]:
    """Every file of a pipeline folder but its weights and the pipeline's model card, with its path relative
    to the folder: what a result copies unchanged (model_index.json, each component's config, the scheduler,
    the tokenizer)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            rel = path.relative_to(root).as_posix()
            if filename.endswith(WEIGHT_SUFFIXES) or filename.endswith(".index.json") or rel == "README.md":
                continue
            if filename.startswith("."):
                continue
            found.append((path, rel))
    return found


def pipeline_shards(
    specs: Sequence[TensorSpec], homes: Mapping[str, Path], root: Path, max_shard_size: int | None
) -> list[Shard]:
    """A pipeline result's files: each component's tensors in the files of the same names as the base's
    (``homes``: a tensor's file in the base), or, with ``max_shard_size`` (or a base component in pickles),
    in shards of the component's own stem (diffusion_pytorch_model-00001-of-00002.safetensors); every file
    in its component's folder, the tensors under their names there."""
    by_component: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        by_component.setdefault(component_of(spec.name)[0], []).append(spec)
    shards: list[Shard] = []
    for component, group in sorted(by_component.items()):
        files = {s.name: homes[s.name].relative_to(root / component).as_posix() for s in group if s.name in homes}
        first = min(files.values(), default="diffusion_pytorch_model.safetensors")
        stem = first.split("-0")[0].split(".")[0]
        if max_shard_size is not None or not first.endswith(".safetensors"):
            size = max_shard_size if max_shard_size is not None else parse_size("5GB")
            planned = plan_shards(group, max_shard_size=size, prefix=stem)
        else:
            planned = shards_like(group, files, fallback=first)
        shards += [Shard(f"{component}/{s.filename}", s.tensors, strip=f"{component}.") for s in planned]
    return shards
