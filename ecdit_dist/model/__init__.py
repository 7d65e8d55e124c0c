"""The EC-DiT network. Plain PyTorch: nothing here imports torch.distributed."""

from ecdit_dist.model.ecdit import ECDiT, patchify, unpatchify
from ecdit_dist.model.moe import ExpertChoiceMoE, FeedForward, GroupedExperts, TokenChoiceMoE

__all__ = ["ECDiT", "ExpertChoiceMoE", "TokenChoiceMoE", "FeedForward", "GroupedExperts", "patchify", "unpatchify"]
