"""Errors of the checkpoint package (a module of its own so every part can raise them)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or unsafe, or saving one failed."""
