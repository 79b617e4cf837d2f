"""Checkpoint input and output: reading by headers, streaming atomic writing, sidecar files."""

from .checkpoint import Checkpoint, TensorInfo, open_checkpoint
from .layout import Shard, TensorSpec, parse_size, plan_shards, shards_like
from .writer import CheckpointWriter

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "Shard",
    "TensorInfo",
    "TensorSpec",
    "open_checkpoint",
    "parse_size",
    "plan_shards",
    "shards_like",
]
