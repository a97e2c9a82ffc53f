"""Export: packed checkpoints."""

from bitsmith.export.checkpoint import CheckpointError, load, save
from bitsmith.export.pack import pack, unpack

__all__ = ["CheckpointError", "load", "pack", "save", "unpack"]
