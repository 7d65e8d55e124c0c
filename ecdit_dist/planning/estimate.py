"""Memory, FLOPs, communication and step time of one layout, from the shapes the code runs.

Every count follows the model code line by line (see docs/PLANNING.md for the derivation):
activations are the tensors autograd saves for backward, FLOPs the matmuls and attention
products torch's FLOP counter sees, all-to-all bytes the buffers `parallel/ep.py` exchanges.
Nothing here needs a process group, a GPU or memory: big models are read from the meta device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ecdit_dist.config import Config
from ecdit_dist.model.moe import expert_capacity
from ecdit_dist.parallel.dims import ParallelDims
from ecdit_dist.planning.shards import ParamInfo, local_numels, unit_numels

GIB = 2 ** 30
# H100 SXM dense peaks (no sparsity): bf16 989.4 TFLOP/s; fp32 training runs its matmuls in TF32.
PEAK_TFLOPS = {"bf16": 989.4, "fp32": 494.7}
TIMESTEP_FREQ = 256      # TimestepEmbedder's sinusoid width


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_mem_gb: float
    """Memory of one accelerator in GiB (an H100-80GB has 79.6 GiB; we use 80)."""
    peak_tflops: float | None = None
    """Dense peak of one accelerator at the training precision; None = H100 SXM (PEAK_TFLOPS)."""
    intra_node_gbps: float = 2400.0
    """Achievable per-GPU, per-direction bandwidth inside a node, Gbit/s (H100 NVLink: 3600 nominal)."""
    inter_node_gbps: float = 320.0
    """Achievable per-GPU, per-direction bandwidth between nodes, Gbit/s (one 400G NIC per GPU)."""
    reserve_frac: float = 0.10
    """Share of memory held back for the CUDA context, NCCL buffers and allocator fragmentation."""
    matmul_efficiency: float = 0.6
    """Share of the peak the matmuls and attention kernels reach."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def peak(self, precision: str) -> float:
        return (self.peak_tflops or PEAK_TFLOPS[precision]) * 1e12


def precision_of(cfg: Config) -> str:
    """The compute precision a plan assumes: train.precision, with "auto" read as on the GPUs
    plans are made for (bf16 autocast with fp32 master weights)."""
    return "bf16" if cfg.train.precision == "auto" else cfg.train.precision


def _bytes(precision: str) -> int:
    """Bytes of a compute-dtype activation."""
    return 2 if precision == "bf16" else 4


def dispatch_rows(cfg: Config, dims: ParallelDims, micro: int) -> int:
    """Rows R of the dispatch buffer one rank builds per MoE layer: every expert takes C tokens of
    every routing group of the tokens this rank routes (its 1/tp share of the micro-batch)."""
    moe = cfg.moe
    routed = micro * cfg.model.train_tokens_per_image // dims.tp
    groups = routed // moe.group_size
    if moe.router == "token_choice":
        # the GShard baseline: a static buffer of cap slots per expert and group (g without a cap)
        cap = moe.group_size
        if moe.token_capacity_factor is not None:
            cap = min(cap, math.ceil(moe.top_k * moe.group_size * moe.token_capacity_factor / moe.num_experts))
        return moe.num_experts * cap * groups
    return moe.num_experts * expert_capacity(moe.group_size, moe.capacity_factor, moe.num_experts) * groups


# --------------------------------------------------------------------------- activations
def block_activations(cfg: Config, dims: ParallelDims, micro: int, is_moe: bool) -> int:
    """Bytes one block saves for backward on one rank, for `micro` images (no checkpointing).

    fp32 runs keep every saved tensor in fp32; bf16 autocast keeps matmul and attention inputs
    in bf16 and layer-norm inputs, statistics, router probabilities and gates in fp32."""
    m, moe = cfg.model, cfg.moe
    a, f = _bytes(precision_of(cfg)), 4
    bf16 = precision_of(cfg) == "bf16"
    tp, d, hd = dims.tp, m.hidden_dim, m.head_dim
    B, S, L = micro, m.train_tokens_per_image, m.text_len
    n = B * S                                           # image tokens of this rank
    h, hkv, hc = m.num_heads // tp, m.num_kv_heads // tp, (m.cross_kv_heads or m.num_heads) // tp
    k = 6 if m.adaln == "attn_ffn" else 3
    total = 0
    total += B * d * a + B * k * d * a                  # adaLN: silu(c) and the modulation vectors
    total += n * d * f + 2 * n * f + n * d * f + B * d * a    # norm1: input, mean/rstd, output; 1 + scale
    total += n * d * a                                  # modulated input of q/k/v
    total += (2 * n * h * hd + 2 * n * hkv * hd) * a + B * h * S * f   # attention: q, out, k, v; logsumexp
    total += n * d * a                                  # attention output (saved by the gate)
    total += n * d * f + 2 * n * f + n * d * a          # norm2: input, mean/rstd; output into q
    total += (2 * n * h * hd + 2 * B * L * hc * hd) * a + B * h * S * f + B * L * f   # cross-attention, mask
    if bf16:
        total += 2 * B * L * m.text_dim * a             # autocast casts the text once for k and once for v
    total += n * d * f + 2 * n * f                      # norm3: input, mean/rstd
    if m.adaln == "attn_ffn":
        total += n * d * f + B * d * a + n * d * a      # FFN modulation and gate
    if not is_moe:
        total += (n * d * f if not bf16 else n * d * a) + 2 * n * (m.ffn_hidden // tp) * a
        return total
    E = moe.num_experts
    routed = n // tp                                    # tokens this rank routes
    R = dispatch_rows(cfg, dims, micro)
    total += n * d * f                                  # norm3 output, read by the router in fp32
    total += routed * E * f + 2 * R * 8                 # affinity; top-C indices and flat rows (int64)
    total += 2 * R * d * a + 2 * R * m.ffn_hidden * a   # expert input and output; w1 output and GELU
    total += R * f + R * d * (f if bf16 else a)         # gate; gate x output (fp32 under autocast)
    return total


def root_activations(cfg: Config, dims: ParallelDims, micro: int) -> int:
    """Bytes saved outside the blocks: embeddings, final layer, loss, and what blocks share."""
    m = cfg.model
    a, f = _bytes(precision_of(cfg)), 4
    B, S, d = micro, m.train_tokens_per_image, m.hidden_dim
    n, out = B * S, m.patch_size ** 2 * m.in_channels
    total = B * m.tokens_per_image * out * a + B * S * 8          # patch embedding input; kept indices
    total += B * m.tokens_per_image * d * f                        # every token's embedding (read by the gather)
    total += B * TIMESTEP_FREQ * a + 2 * B * d * a + B * d * a     # timestep MLP inputs; c (read by every adaLN)
    if precision_of(cfg) != "bf16":
        total += B * m.text_len * m.text_dim * f                  # the text, shared by every cross-attention
    total += n * d * f + 2 * n * f + n * d * f + B * d * a + B * d * a + 2 * B * d * a + n * d * a  # final layer
    total += n * out * f                                           # loss: prediction - target
    return total


def exchange_outputs(cfg: Config, dims: ParallelDims, micro: int) -> int:
    """Bytes of the exchange outputs one checkpointed MoE block keeps for its recompute: the
    all-to-all dispatch (the fp32 layer-norm output) and combine (expert output dtype) under
    expert parallelism, the gathered layer output (all tokens, compute dtype) under tensor
    parallelism."""
    if not cfg.moe.num_experts:
        return 0
    a, d = _bytes(precision_of(cfg)), cfg.model.hidden_dim
    total = 0
    if dims.ep > 1:
        total += dispatch_rows(cfg, dims, micro) * d * (4 + a)
    if dims.tp > 1:
        total += micro * cfg.model.train_tokens_per_image * d * a
    return total


def activations(cfg: Config, dims: ParallelDims, micro: int, checkpointing: bool) -> dict[str, int]:
    """Saved bytes of one micro-batch held from the end of forward to backward, plus the peak
    extra of backward (the recomputed block under checkpointing, and one block's gradients)."""
    blocks = [cfg.moe.is_moe_layer(i) for i in range(cfg.model.num_layers)]
    per = {flag: block_activations(cfg, dims, micro, flag) for flag in set(blocks)}
    root = root_activations(cfg, dims, micro)
    biggest = max(per.values())
    if checkpointing:
        # a checkpointed block keeps its input hidden states (c, text and mask are shared), and
        # the outputs of its exchanges, which the recompute reuses instead of communicating again
        held = root + len(blocks) * micro * cfg.model.train_tokens_per_image * cfg.model.hidden_dim * 4
        held += sum(blocks) * exchange_outputs(cfg, dims, micro)
        extra = 2 * biggest
    else:
        held = root + sum(per[f] for f in blocks)
        extra = biggest
    return {"held": held, "backward_extra": extra, "dense_block": per.get(False, 0), "moe_block": per.get(True, 0),
            "root": root}


# --------------------------------------------------------------------------- FLOPs
# parts of `forward_flops` that tensor parallelism splits by weights (the rest it splits by
# tokens or heads, or repeats on every tp rank)
TP_SPLIT_PARTS = ("attention", "cross_attention", "text_kv", "ffn")


def forward_flops(cfg: Config, dims: ParallelDims, micro: int) -> dict[str, float]:
    """Forward FLOPs of one micro-batch on one rank by part (2 per multiply-add): linear layers,
    attention products (scores and values), the router and the experts at capacity."""
    m, moe = cfg.model, cfg.moe
    tp, d, hd = dims.tp, m.hidden_dim, m.head_dim
    B, S, L = micro, m.train_tokens_per_image, m.text_len
    n = B * S
    h, hkv, hc = m.num_heads // tp, m.num_kv_heads // tp, (m.cross_kv_heads or m.num_heads) // tp
    k = 6 if m.adaln == "attn_ffn" else 3
    out = m.patch_size ** 2 * m.in_channels
    parts = {"embed": 2 * B * m.tokens_per_image * out * d + 2 * B * TIMESTEP_FREQ * d + 2 * B * d * d,
             "final": 2 * B * d * 2 * d + 2 * n * d * out,
             "adaln": 0.0, "attention": 0.0, "attention_scores": 0.0, "cross_attention": 0.0, "cross_scores": 0.0,
             "text_kv": 0.0, "ffn": 0.0, "router": 0.0, "experts": 0.0}
    for i in range(m.num_layers):
        parts["adaln"] += 2 * B * d * k * d                          # repeated on every tp rank
        parts["attention"] += 2 * n * d * (2 * h + 2 * hkv) * hd     # q, k, v, o
        parts["attention_scores"] += 4 * B * h * S * S * hd
        parts["cross_attention"] += 2 * n * d * 2 * h * hd           # q, o
        parts["cross_scores"] += 4 * B * h * S * L * hd
        parts["text_kv"] += 2 * B * L * m.text_dim * 2 * hc * hd
        if moe.is_moe_layer(i):
            routed = n // tp                                          # tp ranks route disjoint shares
            parts["router"] += 2 * routed * d * moe.num_experts
            parts["experts"] += 4 * dispatch_rows(cfg, dims, micro) * d * m.ffn_hidden
        else:
            parts["ffn"] += 4 * n * d * (m.ffn_hidden // tp)
    return parts


def step_flops(cfg: Config, dims: ParallelDims, micro: int, checkpointing: bool) -> float:
    """Forward + backward (+ recompute) FLOPs of one micro-batch on one rank. Backward is twice
    the forward for a matmul (input and weight gradients), once where the input needs no gradient
    (patch embedding, first timestep layer), 2.5 times for attention (scores recomputed)."""
    p = forward_flops(cfg, dims, micro)
    m = cfg.model
    B, S, d, tp = micro, m.train_tokens_per_image, m.hidden_dim, dims.tp
    sdpa = p["attention_scores"] + p["cross_scores"]
    no_input_grad = 2 * B * m.tokens_per_image * m.patch_size ** 2 * m.in_channels * d + 2 * B * TIMESTEP_FREQ * d
    fwd = sum(p.values())
    total = 3 * fwd - no_input_grad + 0.5 * sdpa
    if checkpointing:
        # recompute of every block, which stops once the last tensor backward needs exists: a
        # dense block's second FFN matrix feeds only the residual sum, so it is not recomputed
        total += fwd - p["embed"] - p["final"]
        if m.adaln == "attn":
            dense = sum(not cfg.moe.is_moe_layer(i) for i in range(m.num_layers))
            total -= dense * 2 * B * S * d * (m.ffn_hidden // tp)
    return total


# --------------------------------------------------------------------------- communication
def a2a_bytes(cfg: Config, dims: ParallelDims, micro: int, checkpointing: bool) -> int:
    """Bytes each rank hands to all_to_all_single in one micro-batch: forward dispatch and combine,
    the same in backward. A checkpointed recompute reuses the forward's outputs and sends nothing.
    Under bf16 autocast the dispatch carries the fp32 layer-norm output and the combine the bf16
    expert output."""
    if dims.ep == 1 or not cfg.moe.num_experts:
        return 0
    m, moe = cfg.model, cfg.moe
    per_layer = dispatch_rows(cfg, dims, micro) * m.hidden_dim * (4 + _bytes(precision_of(cfg)))
    layers = sum(moe.is_moe_layer(i) for i in range(m.num_layers))
    return per_layer * layers * 2


def tp_bytes(cfg: Config, dims: ParallelDims, micro: int) -> int:
    """Bytes each rank reduces or gathers over tp in one micro-batch (forward and backward)."""
    if dims.tp == 1:
        return 0
    m = cfg.model
    a = _bytes(precision_of(cfg))
    n, d = micro * m.train_tokens_per_image, m.hidden_dim
    text = micro * m.text_len * m.text_dim
    total = 0
    for i in range(m.num_layers):
        total += 2 * n * d * a + 2 * n * d * a + text * 4   # o_proj outputs (fwd); q/k/v input grads (bwd); text grad
        total += 2 * n * d * a                               # dense FFN: w2 output, w1 input grad; MoE: gathers
    return total


def _link_time(nbytes: float, group: int, stride: int, cluster: Cluster) -> float:
    """Seconds for one rank to send `nbytes` spread evenly over all members of its group (itself
    included, as all-to-all and ring collectives do) of `group` ranks spaced `stride` ranks apart.
    Members in the same node use the intra-node link, the others the inter-node link, in parallel."""
    if group <= 1 or nbytes == 0:
        return 0.0
    G = cluster.gpus_per_node
    per_node = max(1, min(group, G // stride)) if stride < G else 1
    intra_bw, inter_bw = cluster.intra_node_gbps * 1e9 / 8, cluster.inter_node_gbps * 1e9 / 8
    intra = nbytes * (per_node - 1) / group
    inter = nbytes * (group - per_node) / group
    return max(intra / intra_bw, inter / inter_bw)


# --------------------------------------------------------------------------- one plan
def plan_layout(cfg: Config, dims: ParallelDims, cluster: Cluster, params: list[ParamInfo]) -> dict:
    t = cfg.train
    prec = precision_of(cfg)
    per_rank_batch = t.global_batch_size // dims.dp
    micro = t.micro_batch_size or per_rank_batch
    accum = per_rank_batch // micro
    ac = t.activation_checkpointing

    numel = sum(local_numels(params, dims, 0).values())   # rank 0 holds the largest (padded) shards
    p_bytes = numel * 4                                      # fp32 master weights
    g_bytes = numel * 4                                      # fp32 gradients (FSDP reduce dtype)
    states = 1 if (cfg.optim.name == "rmsprop" and cfg.optim.momentum == 0) else 2
    o_bytes = numel * 4 * states
    ema_bytes = numel * 4 if cfg.optim.ema_decay > 0 else 0

    units = unit_numels(params, dims)
    bf16 = prec == "bf16"
    largest_unit = 0
    if dims.world == 1:
        gathered = numel * 2 if bf16 else 0     # autocast's bf16 weight copies, saved for backward
    else:
        # FSDP materialises a unit when it is sharded (or cast to bf16): the root stays gathered, two
        # blocks are in flight (current + prefetched), and one block's unsharded fp32 gradients wait
        # for their reduce-scatter
        dense_on, expert_on = dims.dp_shard > 1 or bf16, dims.edp > 1 or bf16
        blocks = [units.get(f"block{i}", 0) * dense_on + units.get(f"experts{i}", 0) * expert_on
                  for i in range(cfg.model.num_layers)]
        grads = [units.get(f"block{i}", 0) * (dims.dp_shard > 1) + units.get(f"experts{i}", 0) * (dims.edp > 1)
                 for i in range(cfg.model.num_layers)]
        gathered = units["root"] * _bytes(prec) * dense_on + 2 * max(blocks) * _bytes(prec) + max(grads) * 4
        largest_unit = max(blocks) * _bytes(prec)
    act = activations(cfg, dims, micro, ac)
    a2a_step = a2a_bytes(cfg, dims, micro, ac) * accum
    # send and receive buffers of one dispatch (fp32 layer-norm output)
    a2a_buffer = 2 * dispatch_rows(cfg, dims, micro) * cfg.model.hidden_dim * 4 if a2a_step else 0
    capacity = cluster.gpu_mem_gb * GIB
    reserve = cluster.reserve_frac * capacity
    total = p_bytes + g_bytes + o_bytes + ema_bytes + gathered + act["held"] + act["backward_extra"] + a2a_buffer
    fits = total + reserve <= capacity

    # ---- step
    flops_rank = step_flops(cfg, dims, micro, ac) * accum
    model = ParallelDims(world=1, dp_replicate=1, dp_shard=1, tp=1, ep=1)
    model_flops = step_flops(cfg, model, t.global_batch_size, False)
    hw_flops = flops_rank * dims.world      # what the ranks execute: tp copies and recompute included
    peak = cluster.peak(prec)
    compute_s = flops_rank / (peak * cluster.matmul_efficiency)
    a2a_s = _link_time(a2a_step, dims.ep, 1, cluster)
    tp_step = tp_bytes(cfg, dims, micro) * accum
    tp_s = _link_time(2 * tp_step, dims.tp, 1, cluster)          # a ring all-reduce sends 2 (n-1)/n
    a = _bytes(prec)
    dense_units = sum(v for k, v in units.items() if not k.startswith("experts"))
    expert_units = sum(v for k, v in units.items() if k.startswith("experts"))
    root = units["root"]
    ag_dense = ((2 * (dense_units - root) + root) * a * accum) if dims.dp_shard > 1 and dims.world > 1 else 0
    ag_expert = (2 * expert_units * a * accum) if dims.edp > 1 and dims.world > 1 else 0
    rs_dense = dense_units * 4 * accum if dims.dp_shard > 1 and dims.world > 1 else 0
    rs_expert = expert_units * 4 * accum if dims.edp > 1 and dims.world > 1 else 0
    ar_rep = 2 * numel * 4 * accum if dims.dp_replicate > 1 else 0
    fsdp_s = (_link_time(ag_dense + rs_dense, dims.dp_shard, dims.tp, cluster)
              + _link_time(ag_expert + rs_expert, dims.edp, dims.ep, cluster)
              + _link_time(ar_rep, dims.dp_replicate, dims.dp_shard * dims.tp, cluster))
    exposed = max(0.0, fsdp_s - compute_s)
    time_s = compute_s + a2a_s + tp_s + exposed
    mfu = model_flops / (time_s * dims.world * peak)
    layout = {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "tp": dims.tp, "ep": dims.ep,
              "edp": dims.dp_replicate * dims.edp, "micro_batch_size": micro, "grad_accumulation": accum,
              "activation_checkpointing": ac, "precision": prec, "optimizer": cfg.optim.name,
              "global_batch_size": t.global_batch_size}
    per_rank = {"params_bytes": p_bytes, "grads_bytes": g_bytes, "optimizer_bytes": o_bytes, "ema_bytes": ema_bytes,
                "gathered_bytes": gathered, "largest_gathered_block_bytes": largest_unit,
                "activations_bytes": act["held"],
                "activations_bytes_by_checkpointing": {
                    "off": act["held"] if not ac else activations(cfg, dims, micro, False)["held"],
                    "on": act["held"] if ac else activations(cfg, dims, micro, True)["held"]},
                "backward_peak_extra_bytes": act["backward_extra"], "a2a_buffer_bytes": a2a_buffer,
                "total_bytes": int(total), "reserve_bytes": int(reserve), "capacity_bytes": int(capacity),
                "param_elements": numel, "activations_per_block": {"dense": act["dense_block"],
                                                                   "moe": act["moe_block"], "root": act["root"]}}
    step = {"flops": hw_flops, "model_flops": model_flops, "flops_per_rank": flops_rank,
            "a2a_bytes_per_rank": a2a_step, "tp_bytes_per_rank": tp_step,
            "fsdp_allgather_bytes_per_rank": ag_dense + ag_expert, "fsdp_reduce_scatter_bytes_per_rank": rs_dense + rs_expert,
            "hsdp_allreduce_bytes_per_rank": ar_rep,
            "compute_s": compute_s, "a2a_s": a2a_s, "tp_s": tp_s, "fsdp_s": fsdp_s, "fsdp_exposed_s": exposed,
            "time_s": time_s, "mfu": mfu, "images_per_s": t.global_batch_size / time_s}
    return {"world": dims.world, "layout": layout, "per_rank": per_rank, "fits": bool(fits),
            "headroom_bytes": int(capacity - reserve - total), "step": step}
