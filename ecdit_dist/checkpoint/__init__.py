"""Sharded training checkpoints (DCP) and the tools that convert them."""

from ecdit_dist.checkpoint.manager import CheckpointError, CheckpointManager, verify_checkpoint

__all__ = ["CheckpointError", "CheckpointManager", "verify_checkpoint"]
