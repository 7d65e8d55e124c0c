"""Sampling: which images depend on their batch companions through expert-choice groups.

Expert choice routes `moe.eval_group_size` consecutive tokens together, so prompts whose
passes share a group choose experts together. The tiny preset has 64 tokens per image;
these tests build it with fresh random weights (every zero-initialised weight moved, so
the MoE output reaches the velocity) and compare one prompt sampled alone, and beside
random companions, at each eval group size. They run in float64: float32 batched matmuls
sum in a batch-size-dependent order, which alone moves a sample by a few 1e-6 even with the
experts switched off; in float64 only a change of expert choices can move it by 1e-6.
"""

import random

import pytest
import torch

from ecdit_dist.config import config_from_dict
from ecdit_dist.model import ECDiT
from ecdit_dist.sample import generate, routes_prompts_alone

TOKENS = 64          # tiny preset: (16 / 2) ** 2 tokens per image
STEPS = 2
CFG = 4.0


def fresh_seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


def random_model(eval_group_size: int, **moe) -> ECDiT:
    cfg = config_from_dict({"model": {"preset": "tiny"}, "moe": {"eval_group_size": eval_group_size, **moe}},
                           validate=False)
    model = ECDiT(cfg.model, cfg.moe).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)           # adaLN gates, final layer, output projections live
        for moe in model.moe_layers():
            moe.router.weight.normal_(std=0.5)           # clear, not near-uniform, affinities
    return model.eval()


def prompts(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.randn(n, 16, 64, dtype=torch.float64)
    mask = torch.rand(n, 16) < 0.7
    mask[:, 0] = True
    return text * mask[..., None], mask


def companion_change(model: ECDiT, cfg_scale: float) -> float:
    """Largest change of an image when its batch companions change (max abs over latents).

    Compares image 0 alone with image 0 beside two random prompts, and image 2 (noise keyed
    by its index) beside two companions with the same image beside two other companions.
    """
    seed = random.SystemRandom().randrange(2**31)
    p, m = prompts(1)
    a, am = prompts(2)
    b, bm = prompts(2)
    alone = generate(model, p, m, STEPS, cfg_scale, seed)
    first = generate(model, torch.cat([p, a]), torch.cat([m, am]), STEPS, cfg_scale, seed)
    last_a = generate(model, torch.cat([a, p]), torch.cat([am, m]), STEPS, cfg_scale, seed)
    last_b = generate(model, torch.cat([b, p]), torch.cat([bm, m]), STEPS, cfg_scale, seed)
    assert torch.isfinite(first).all() and first.abs().max() > 0.1
    return max((alone[0] - first[0]).abs().max().item(), (last_a[2] - last_b[2]).abs().max().item())


def test_the_moe_reaches_the_sampled_image():
    """Without this the independence tests below could pass with a dead MoE."""
    fresh_seed()
    model = random_model(2 * TOKENS)
    p, m = prompts(2)
    before = generate(model, p, m, STEPS, CFG, seed=7)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.experts.w1.zero_()
    after = generate(model, p, m, STEPS, CFG, seed=7)
    assert (before - after).abs().max() > 1e-2


@pytest.mark.parametrize("images_per_group", [1, 2])
def test_guided_image_is_independent_of_its_batch(images_per_group):
    """The paper's inference group of two images holds one prompt's two passes; one image per
    group holds one pass. Either way a guided image equals itself alone and in any batch."""
    fresh_seed()
    model = random_model(images_per_group * TOKENS)
    assert routes_prompts_alone(model, guided=True)
    assert companion_change(model, CFG) <= 1e-6


@pytest.mark.parametrize("group_tokens, guided, alone", [
    (TOKENS // 2, False, True), (TOKENS // 2, True, True),    # half an image: groups inside one pass
    (TOKENS, False, True),                                      # one image without guidance
    (2 * TOKENS, False, False),                                 # two images, no guidance: two prompts share
    (4 * TOKENS, True, False), (4 * TOKENS, False, False),      # four images: two or four prompts share
])
def test_independence_is_as_documented(group_tokens, guided, alone):
    """`routes_prompts_alone` is what the sampler really does, in both directions."""
    fresh_seed()
    model = random_model(group_tokens)
    assert routes_prompts_alone(model, guided) is alone
    change = companion_change(model, CFG if guided else 1.0)
    if alone:
        assert change <= 1e-6
    else:
        assert change > 1e-3


@pytest.mark.parametrize("token_capacity_factor, alone", [(None, True), (0.5, False)])
def test_token_choice_mixes_only_through_its_capacity(token_capacity_factor, alone):
    """Token choice routes each token on its own unless the expert buffers are limited (at 0.5
    they hold half the assignments, so tokens of different prompts compete for them)."""
    fresh_seed()
    model = random_model(4 * TOKENS, router="token_choice", token_capacity_factor=token_capacity_factor)
    assert routes_prompts_alone(model, guided=True) is alone
    change = companion_change(model, CFG)
    assert change <= 1e-6 if alone else change > 1e-3


def test_padding_to_whole_groups_is_dropped():
    """Three images at a two-image group without guidance: the batch is padded with a copy of
    the last prompt; the result has the asked size and the first pair does not see the padding."""
    fresh_seed()
    model = random_model(2 * TOKENS)
    p, m = prompts(3)
    three = generate(model, p, m, STEPS, 1.0, seed=3)
    two = generate(model, p[:2], m[:2], STEPS, 1.0, seed=3)
    assert three.shape == (3, 8, 16, 16)
    assert (three[:2] - two).abs().max() <= 1e-6

