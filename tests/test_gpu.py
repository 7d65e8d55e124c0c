"""The GPU test set: run where CUDA exists, skipped (and reported as skipped) elsewhere.

    python -m pytest -m gpu tests/test_gpu.py -v -rs

Each test checks a GPU run against a reference: the same computation in fp32, in float64 on
the CPU, on one GPU, or on the CPU. Multi-GPU tests use every visible GPU (at least 2; the
tp x ep layouts need 4).
"""

import pytest
import torch

from ecdit_dist.parallel.local import run_ranks
from gpu_workers import audited_run, bf16_run, init_weights, moe_layer_cuda, on_cpu, sync_count, train_losses

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NGPU == 0, reason="needs a CUDA GPU (none visible)")]
needs_2 = pytest.mark.skipif(NGPU < 2, reason=f"needs 2 GPUs, {NGPU} visible")
needs_4 = pytest.mark.skipif(NGPU < 4, reason=f"needs 4 GPUs, {NGPU} visible")

# Tolerances of the GPU contract (docs/PARALLELISM.md, "Precision and tolerances").
FP32_GPU_RTOL = 2e-3       # fp32 (TF32 matmuls) on GPU vs fp32 on CPU, losses of the first steps
LAYOUT_FP32_RTOL = 1e-4    # N GPUs vs 1 GPU, fp32: reduction order and index_add atomics only
BF16_VS_FP32_RTOL = 3e-2   # bf16 autocast + FSDP2 bf16 policy vs fp32, losses of the first steps
BF16_LAYOUT_RTOL = 2e-2    # bf16 on N GPUs vs bf16 on 1 GPU


def _layout(n: int) -> list[str]:
    if n >= 4:
        return ["parallel.tp=2", "parallel.ep=2"]
    return ["parallel.ep=2"]


def test_tiny_training_on_one_gpu_matches_cpu(tmp_path):
    """fp32 on one GPU follows the CPU run (same seeded weights, same data)."""
    cpu = run_ranks(on_cpu, 1, tmp_path / "cpu", "train_losses", ["train.precision=fp32"], str(tmp_path / "a"), 3,
                    timeout=600)
    gpu = train_losses(0, 1, ["train.precision=fp32"], str(tmp_path / "b"), 3)
    assert gpu == pytest.approx(cpu[0], rel=FP32_GPU_RTOL)


@needs_2
def test_tiny_training_on_all_gpus_matches_one_gpu(tmp_path):
    n = min(NGPU, 4)
    one = train_losses(0, 1, ["train.precision=fp32"], str(tmp_path / "a"), 3)
    many = run_ranks(train_losses, n, tmp_path / "ranks", ["train.precision=fp32", *_layout(n)],
                     str(tmp_path / "b"), 3, timeout=600)[0]
    assert many == pytest.approx(one, rel=LAYOUT_FP32_RTOL)


def test_bf16_training_tracks_fp32(tmp_path):
    fp32 = train_losses(0, 1, ["train.precision=fp32"], str(tmp_path / "a"), 3)
    bf16 = train_losses(0, 1, ["train.precision=bf16"], str(tmp_path / "b"), 3)
    assert bf16 == pytest.approx(fp32, rel=BF16_VS_FP32_RTOL)


@needs_2
def test_bf16_fsdp_routes_like_one_gpu_and_keeps_router_fp32(tmp_path):
    """FSDP2 bf16 on all GPUs: t and the router in fp32, expert choices equal one GPU's."""
    n = min(NGPU, 4)
    one = run_ranks(bf16_run, 1, tmp_path / "one", [], str(tmp_path / "a"), 3, timeout=600)[0]
    many = run_ranks(bf16_run, n, tmp_path / "many", _layout(n), str(tmp_path / "b"), 3, timeout=600)[0]
    assert many["t_dtype"] == ["torch.float32"]
    assert many["router"] == [("torch.float32", "torch.float32", "torch.float32")]
    for a, b in zip(many["choices"], one["choices"]):
        assert torch.equal(a, b)
    assert many["losses"] == pytest.approx(one["losses"], rel=BF16_LAYOUT_RTOL)


@needs_2
@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_expert_exchange_on_nccl_equals_one_process(router, tmp_path):
    """The expert-parallel all-to-all (and token choice's device-typed index tensors) on NCCL."""
    n = 4 if NGPU >= 4 else 2
    results = run_ranks(moe_layer_cuda, n, tmp_path, 1234, router, timeout=300)
    for r in results:
        torch.testing.assert_close(r["out"], r["ref_out"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["dx"], r["ref_dx"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["w1_grad"], r["ref_w1_grad"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel,masked", [("FLASH_ATTENTION", False), ("EFFICIENT_ATTENTION", True)])
def test_sdpa_fused_kernels_with_gqa_and_padding_bias(kernel, masked):
    """Self-attention (GQA, no mask) runs in FlashAttention; cross-attention with the padding bias
    of `attention_bias` in the memory-efficient kernel; both equal a float64 reference."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ecdit_dist.model.attention import attention_bias

    g = torch.Generator().manual_seed(7)
    B, H, Hkv, S, L, hd = 2, 8, 2, 256, 77, 64
    q = torch.randn(B, H, S, hd, generator=g)
    k, v = torch.randn(B, Hkv, L if masked else S, hd, generator=g), torch.randn(B, Hkv, L if masked else S, hd, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 20:] = False
    dev = torch.device("cuda")
    bias = attention_bias(mask.to(dev), torch.bfloat16) if masked else None
    with sdpa_kernel([getattr(SDPBackend, kernel)]):      # only this kernel: an unsupported case raises
        out = F.scaled_dot_product_attention(q.to(dev, torch.bfloat16), k.to(dev, torch.bfloat16),
                                             v.to(dev, torch.bfloat16), attn_mask=bias, enable_gqa=True)
    rep = H // Hkv
    kd, vd = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = q.double() @ kd.transpose(-1, -2) / hd ** 0.5
    if masked:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = scores.softmax(-1) @ vd
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2)


def test_one_host_sync_in_the_expert_choice_step(tmp_path):
    """torch.cuda.set_sync_debug_mode counts the synchronising calls of one training step (bf16,
    clipping on, EMA on, accumulation over 2 micro-batches): one, the step report's read of the
    non-finite verdict, preemption flag, loss and gradient norm (ecdit_dist/step_report.py)."""
    n = sync_count(0, 1, ["train.precision=bf16", "train.micro_batch_size=16"], str(tmp_path))
    assert n == 1, f"{n} host synchronisations in one training step"


@needs_2
def test_one_host_sync_in_the_distributed_expert_choice_step(tmp_path):
    n = min(NGPU, 4)
    counts = run_ranks(sync_count, n, tmp_path / "ranks", ["train.precision=bf16", *_layout(n)],
                       str(tmp_path / "run"), timeout=600)
    assert counts == [1] * n


def test_weights_on_gpu_equal_cpu_init(tmp_path):
    gpu = init_weights(0, 1, [], str(tmp_path / "a"))
    cpu = run_ranks(on_cpu, 1, tmp_path / "cpu", "init_weights", [], str(tmp_path / "b"), timeout=300)[0]
    for name, want in cpu["full"].items():
        assert torch.equal(gpu["meta"][name], want) and torch.equal(gpu["full"][name], want), name


def _assert_async_equals_sync(results, root, steps: int) -> None:
    from ecdit_dist.checkpoint.tensors import DCPSource

    for r in results:
        assert all(torch.equal(a, b) for a, b in zip(r["sync"]["params"], r["async"]["params"]))
        assert all(torch.equal(v, r["async"]["ema"][k]) for k, v in r["sync"]["ema"].items())
    assert results[0]["sync"]["losses"] == results[0]["async"]["losses"] and len(results[0]["sync"]["losses"]) == steps
    for step in range(2, steps + 1, 2):                   # the files, tensor by tensor
        a = DCPSource(root / "sync" / "checkpoints" / f"step-{step:08d}")
        b = DCPSource(root / "async" / "checkpoints" / f"step-{step:08d}")
        assert a.infos.keys() == b.infos.keys()
        assert all(torch.equal(a.load(n), b.load(n)) for n in a.infos), step


def test_async_save_equals_sync_save_on_one_gpu(tmp_path):
    """A background checkpoint save (staged from GPU memory while training goes on) writes the
    same bits, and leaves the same training run, as a synchronous one, after 4 steps."""
    from workers import async_vs_sync

    _assert_async_equals_sync([async_vs_sync(0, 1, str(tmp_path), [], 4)], tmp_path, 4)


@needs_2
def test_async_save_equals_sync_save_on_nccl(tmp_path):
    """The same on all GPUs over NCCL (the background save agrees over its own CPU group)."""
    from workers import async_vs_sync

    n = min(NGPU, 4)
    results = run_ranks(async_vs_sync, n, tmp_path / "ranks", str(tmp_path), _layout(n), 4, timeout=600)
    _assert_async_equals_sync(results, tmp_path, 4)


@needs_2
def test_every_collective_gets_gpu_tensors(tmp_path):
    results = run_ranks(audited_run, 2, tmp_path / "ranks", str(tmp_path / "run"), timeout=600)
    for calls in results:
        assert calls and all(set(t) <= {"cuda"} for _, t in calls)
