"""Parallelism applied to a plain model: tensor, expert and data (FSDP2) parallel."""
