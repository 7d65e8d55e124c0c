"""ecdit-dist: distributed training for EC-DiT diffusion transformers with expert-choice MoE."""

__version__ = "0.1.0"
