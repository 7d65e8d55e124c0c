"""Rectified flow, timestep sampling, the Euler/CFG sampler and the determinism contract."""

import math
import random

import torch

from ecdit_dist.diffusion import draw_training_randomness, euler_sample, interpolate, velocity_target


def fresh_seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


def test_path_endpoints_and_velocity():
    fresh_seed()
    x, eps = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    assert torch.equal(interpolate(x, eps, torch.ones(4)), x)
    assert torch.equal(interpolate(x, eps, torch.zeros(4)), eps)
    t, h = torch.rand(4, dtype=torch.float64), 1e-6
    xd, ed = x.double(), eps.double()
    slope = (interpolate(xd, ed, t + h) - interpolate(xd, ed, t - h)) / (2 * h)
    torch.testing.assert_close(slope, velocity_target(xd, ed), rtol=1e-6, atol=1e-6)


def test_logit_normal_timesteps():
    seed = random.SystemRandom().randrange(2**31)
    mu, sigma = 0.3, 0.8
    d = draw_training_randomness(seed, 0, range(4000), (1, 2, 2), 4, 4, mu, sigma, 0.0)
    assert ((d.t > 0) & (d.t < 1)).all()
    u = torch.logit(d.t.double())
    # 4000 draws: standard errors 0.013 (mean) and 0.009 (std); 5 sigma bounds
    assert abs(u.mean().item() - mu) < 5 * sigma / math.sqrt(4000), seed
    assert abs(u.std().item() - sigma) < 5 * sigma / math.sqrt(2 * 4000), seed


def test_draws_depend_only_on_seed_step_and_global_index():
    seed = random.SystemRandom().randrange(2**31)
    args = ((8, 4, 4), 16, 8, 0.0, 1.0, 0.3)
    whole = draw_training_randomness(seed, 5, range(8), *args)
    halves = [draw_training_randomness(seed, 5, range(r * 4, r * 4 + 4), *args) for r in range(2)]  # 2 ranks
    for field in ("noise", "t", "keep", "drop_text"):
        torch.testing.assert_close(getattr(whole, field), torch.cat([getattr(h, field) for h in halves]), rtol=0, atol=0)
    other_step = draw_training_randomness(seed, 6, range(8), *args)
    assert not torch.equal(whole.noise, other_step.noise)
    assert whole.keep.shape == (8, 8) and all(k.unique().numel() == 8 for k in whole.keep)
    assert (whole.keep.diff(dim=1) > 0).all()                       # sorted token indices


def test_text_dropout_rate():
    seed = random.SystemRandom().randrange(2**31)
    d = draw_training_randomness(seed, 1, range(5000), (1, 2, 2), 4, 4, 0.0, 1.0, 0.1)
    assert abs(d.drop_text.float().mean().item() - 0.1) < 5 * math.sqrt(0.09 / 5000), seed


def test_euler_integrates_a_straight_path_exactly():
    fresh_seed()
    x0, x1 = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    out = euler_sample(lambda x, t, drop: (x1 - x0).clone(), x0, steps=7, cfg_scale=1.0)
    torch.testing.assert_close(out, x1, rtol=1e-12, atol=1e-12)


def test_classifier_free_guidance_combination():
    fresh_seed()
    x0 = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    cond, uncond = torch.randn_like(x0), torch.randn_like(x0)
    seen = []

    def velocity(x, t, drop):
        seen.append((x.clone(), drop.clone()))
        return torch.where(drop.view(-1, 1, 1, 1), uncond.repeat_interleave(2, 0), cond.repeat_interleave(2, 0))

    s = 3.5
    out = euler_sample(velocity, x0, steps=4, cfg_scale=s)
    torch.testing.assert_close(out, x0 + uncond + s * (cond - uncond), rtol=1e-12, atol=1e-12)
    # one image's conditional and null-text passes are adjacent: (cond 0, uncond 0, cond 1, uncond 1)
    x_seen, drop_seen = seen[0]
    assert drop_seen.tolist() == [False, True, False, True]
    assert torch.equal(x_seen, x0.repeat_interleave(2, 0))
