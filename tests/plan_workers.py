"""Measurements of a real training step inside spawned ranks, compared with the planner."""

from __future__ import annotations

from typing import Any

import torch

from workers import QUIET, TINY


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


class SavedBytes:
    """Bytes autograd saves for backward (saved-tensor hooks), each storage once, parameters excluded."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.seen, self.total, self.shapes = model, set(), 0, []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        from torch.distributed._functional_collectives import AsyncCollectiveTensor

        local = _local(t)
        if isinstance(local, AsyncCollectiveTensor):     # a collective's output: wait for the real tensor
            local = local.wait()
        params = {_local(p).untyped_storage().data_ptr() for p in self.model.parameters()}
        key = local.untyped_storage().data_ptr()
        if key not in params and key not in self.seen:
            self.seen.add(key)
            self.total += local.untyped_storage().nbytes()
            self.shapes.append((tuple(local.shape), local.dtype, local.untyped_storage().nbytes()))
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def count_cpu_attention() -> None:
    """Teach torch's FLOP counter the CPU flash-attention kernels, with the convention it uses for
    the CUDA ones: 4 b h s_q s_k d forward (scores and values), 2.5 times that backward (scores
    recomputed; gradients of scores, values, keys and queries). Query heads count (GQA)."""
    from torch.utils.flop_counter import register_flop_formula

    aten = torch.ops.aten
    if getattr(count_cpu_attention, "done", False):
        return

    def fwd(b, h, s_q, d, s_k):
        return 4 * b * h * s_q * s_k * d

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa(query_shape, key_shape, *args, **kwargs):
        b, h, s_q, d = query_shape
        return fwd(b, h, s_q, d, key_shape[2])

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _sdpa_backward(grad_out_shape, query_shape, key_shape, *args, **kwargs):
        b, h, s_q, d = query_shape
        return fwd(b, h, s_q, d, key_shape[2]) * 5 // 2

    count_cpu_attention.done = True


def measure(rank: int, world: int, overrides: list[str], run_dir: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    count_cpu_attention()
    cfg = load_config(TINY, [*overrides, f"run.dir={run_dir}", *QUIET])
    trainer = Trainer(cfg)
    try:
        model = trainer.model
        out: dict[str, Any] = {"params": sum(_bytes(p) for p in model.parameters())}

        # activations of one micro-batch: what the forward pass leaves saved for backward
        per_rank = cfg.train.global_batch_size // trainer.dims.dp
        micro = cfg.train.micro_batch_size or per_rank
        latents, text, mask, draws = trainer.batch(0)
        sl = slice(0, micro)
        with SavedBytes(model) as saved:
            loss = trainer.forward_loss(latents[sl], text[sl], mask[sl], draws.noise[sl], draws.t[sl],
                                        draws.keep[sl] if draws.keep is not None else None, draws.drop_text[sl])
        # plus the exchange outputs checkpointed blocks keep for their recompute (not autograd's)
        from ecdit_dist.parallel.ac import held_exchange_bytes

        out["activations"] = saved.total + held_exchange_bytes()
        del loss

        # one full step: FLOPs and the bytes handed to all_to_all_single
        sent = [0]
        real = dist.all_to_all_single

        def spy(output, input, *args, **kwargs):
            sent[0] += input.numel() * input.element_size()
            return real(output, input, *args, **kwargs)

        dist.all_to_all_single = spy
        try:
            with FlopCounterMode(display=False) as counter:
                trainer.backward_step(0)
        finally:
            dist.all_to_all_single = real
        out["flops"] = counter.get_total_flops()
        out["a2a_bytes"] = sent[0]
        out["grads"] = sum(_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        trainer.optimizer.step()
        out["optimizer"] = sum(_bytes(v) for st in trainer.optimizer.state.values() for v in st.values()
                               if torch.is_tensor(v) and v.dim() > 0)
        out["ema"] = sum(_bytes(v) for v in trainer.ema.shadow.values()) if trainer.ema is not None else 0
    finally:
        trainer.close()
    return out
