"""Typed, validated run configuration.

A run is described by one YAML file plus ``--set a.b=value`` overrides. Every
section is a dataclass whose fields carry their own documentation; unknown keys,
wrong types and inconsistent values fail at load time with a message that names
the key and says what would be valid, before any process group exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or inconsistent."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    preset: Optional[str] = None
    """Architecture preset (see `ecdit presets`). Its values are the defaults for this
    section and for `moe`; keys given explicitly override them."""
    in_channels: int = 8
    """Latent channels produced by the (frozen) VAE."""
    latent_size: int = 32
    """Height = width of the latent grid (256 px images with an 8x VAE give 32)."""
    patch_size: int = 2
    """Side of the square latent patch that becomes one token."""
    hidden_dim: int = 1152
    """Transformer width d."""
    num_layers: int = 28
    """Number of transformer blocks."""
    num_heads: int = 18
    """Query heads of self- and cross-attention."""
    num_kv_heads: int = 6
    """Key/value heads of self-attention (grouped-query attention)."""
    cross_kv_heads: Optional[int] = None
    """Key/value heads of cross-attention; None means num_heads (full width, paper eq. 2)."""
    ffn_dim: Optional[int] = None
    """Hidden width of the FFN and of every expert; None means 4 * hidden_dim."""
    text_dim: int = 2048
    """Width of the text-encoder embeddings that cross-attention reads."""
    text_len: int = 120
    """Maximum number of text tokens."""
    adaln: Literal["attn", "attn_ffn"] = "attn"
    """Where the timestep modulates the block: "attn" = shift/scale/gate around
    self-attention only, so the router sees x_s + MHCA(x_s) unmodulated (paper eq. 4);
    "attn_ffn" = DiT adaLN-Zero around self-attention and the FFN/MoE."""
    mask_ratio: float = 0.5
    """Share of latent tokens dropped per image during training (paper: 0.5)."""
    frozen_text_encoder_params: int = 0
    """Declared size of the external frozen text encoder, for parameter accounting only."""
    frozen_vae_params: int = 0
    """Declared size of the external frozen VAE, for parameter accounting only."""

    def __post_init__(self) -> None:
        _positive(self, "model", ("in_channels", "latent_size", "patch_size", "hidden_dim",
                                   "num_layers", "num_heads", "num_kv_heads", "text_dim", "text_len"))
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise ConfigError(f"model.ffn_dim must be positive or null (= 4 * hidden_dim), got {self.ffn_dim}")
        if self.latent_size % self.patch_size:
            raise ConfigError(f"model.latent_size ({self.latent_size}) must be a multiple of "
                              f"model.patch_size ({self.patch_size})")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"model.hidden_dim ({self.hidden_dim}) must be divisible by "
                              f"model.num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads "
                              f"({self.num_kv_heads}); valid kv heads: {_divisors(self.num_heads)}")
        kv = self.cross_kv_heads
        if kv is not None and (kv <= 0 or self.num_heads % kv):
            raise ConfigError(f"model.cross_kv_heads ({kv}) must divide model.num_heads ({self.num_heads}); "
                              f"valid: {_divisors(self.num_heads)} or null")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.frozen_text_encoder_params < 0 or self.frozen_vae_params < 0:
            raise ConfigError("model.frozen_*_params must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_dim if self.ffn_dim is not None else 4 * self.hidden_dim

    @property
    def tokens_per_image(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @property
    def train_tokens_per_image(self) -> int:
        """Tokens an image keeps after training-time masking."""
        return self.tokens_per_image - int(round(self.tokens_per_image * self.mask_ratio))


@dataclass(kw_only=True, slots=True)
class MoEConfig:
    num_experts: int = 0
    """Experts per MoE layer; 0 builds a dense model."""
    router: Literal["expert_choice", "token_choice"] = "expert_choice"
    """expert_choice: each expert takes its top-C tokens (EC-DiT). token_choice: each
    token takes its top-k experts (GShard baseline, with load-balancing loss)."""
    capacity_factor: float = 2.0
    """Expert choice: average experts per token f_c; C = ceil(group_size * f_c / E)."""
    group_size: int = 1024
    """Consecutive tokens routed together during training (paper: 1024)."""
    eval_group_size: int = 512
    """Consecutive tokens routed together when sampling (paper: 512)."""
    interval: int = 2
    """Every `interval`-th block is MoE, starting with the second (0-based odd blocks)."""
    top_k: int = 2
    """Token choice: experts per token."""
    token_capacity_factor: Optional[float] = 1.25
    """Token choice: expert buffer = ceil(top_k * group_size * this / E); null = no drops."""
    aux_loss_weight: float = 0.01
    """Token choice: weight of the GShard load-balancing loss."""
    expert_gemm: Literal["auto", "bmm", "bmm_contiguous", "mm_loop", "grouped"] = "auto"
    """Expert choice: call form of the expert GEMMs (same products, same result). auto = time
    the candidate forms on the real shapes at first use and keep, per role (forward, input
    gradient, weight gradient), bmm unless another form is at least 10% faster, the same on
    every rank; bmm = batched matmul on the operands as they are; bmm_contiguous = batched matmul on contiguous copies of transposed
    operands; mm_loop = one mm per expert; grouped = torch._grouped_mm (CUDA sm90+, bf16)."""

    def __post_init__(self) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"moe.num_experts must be >= 0 (0 = dense), got {self.num_experts}")
        _positive(self, "moe", ("group_size", "eval_group_size", "interval", "top_k"))
        if self.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor must be > 0 (paper: 2.0), got {self.capacity_factor}")
        if self.num_experts and self.router == "expert_choice":
            if self.capacity_factor > self.num_experts:
                raise ConfigError(f"moe.capacity_factor ({self.capacity_factor}) must be <= moe.num_experts "
                                  f"({self.num_experts}): an expert cannot take more than every token")
            for key in ("group_size", "eval_group_size"):
                g = getattr(self, key)
                if g * self.capacity_factor / self.num_experts < 1:
                    raise ConfigError(
                        f"expert capacity moe.{key} * moe.capacity_factor / moe.num_experts = {g} * "
                        f"{self.capacity_factor} / {self.num_experts} = {g * self.capacity_factor / self.num_experts:g}"
                        f" is below 1 token per expert; raise moe.{key} to at least "
                        f"{math.ceil(self.num_experts / self.capacity_factor)} or moe.capacity_factor")
        if self.num_experts:
            if self.router == "token_choice" and self.top_k > self.num_experts:
                raise ConfigError(f"moe.top_k ({self.top_k}) must be <= moe.num_experts ({self.num_experts})")
        if self.token_capacity_factor is not None and self.token_capacity_factor <= 0:
            raise ConfigError("moe.token_capacity_factor must be > 0 or null (no token dropping)")
        if self.aux_loss_weight < 0:
            raise ConfigError("moe.aux_loss_weight must be >= 0")

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer % self.interval == self.interval - 1


@dataclass(kw_only=True, slots=True)
class DiffusionConfig:
    t_mean: float = 0.0
    """Mean mu_t of u in the logit-normal timestep density t = sigmoid(u)."""
    t_std: float = 1.0
    """Standard deviation sigma_t of u."""
    text_dropout: float = 0.1
    """Probability that a training sample sees the null text (classifier-free guidance)."""

    def __post_init__(self) -> None:
        if self.t_std <= 0:
            raise ConfigError(f"diffusion.t_std must be > 0, got {self.t_std}")
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ConfigError(f"diffusion.text_dropout must be in [0, 1], got {self.text_dropout}")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    name: Literal["rmsprop", "adamw"] = "rmsprop"
    """rmsprop (with momentum, as in the paper) or adamw."""
    lr: float = 1e-4
    """Peak learning rate."""
    warmup_steps: int = 20000
    """Linear warm-up from 0 to lr."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: hold lr, or cosine-decay it to min_lr at train.steps."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""
    momentum: float = 0.9
    """RMSProp momentum."""
    alpha: float = 0.99
    """RMSProp smoothing constant of the squared-gradient average."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """Denominator epsilon."""
    weight_decay: float = 0.0
    """Decoupled (adamw) or L2 (rmsprop) weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""
    ema_decay: float = 0.9999
    """Decay of the exponential moving average of weights; 0 disables EMA."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if not (0 <= self.momentum < 1 and 0 < self.alpha < 1):
            raise ConfigError("optim.momentum must be in [0, 1) and optim.alpha in (0, 1)")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to run."""
    global_batch_size: int = 32
    """Images per optimizer step, summed over all data-parallel ranks."""
    micro_batch_size: Optional[int] = None
    """Images per forward pass on one rank; gradients accumulate over
    global_batch_size / (dp * micro_batch_size) passes. None = no accumulation."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 = autocast compute in bfloat16 with fp32 master weights (FSDP2 gathers bf16 weights and
    reduces gradients in fp32; router, timestep and routing math stay fp32); auto = bf16 on CUDA
    (with TF32 for what stays fp32), fp32 on CPU. docs/PARALLELISM.md, "Precision"."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    init: Literal["auto", "full", "meta"] = "auto"
    """How weights are created: "full" builds the whole model on every rank from the seed, then
    shards it (identical to one process); "meta" builds it without memory, shards it, then
    initialises only the local shards (needed for big models); "auto" = meta above 2B parameters."""
    on_nonfinite: Literal["skip", "stop", "rollback"] = "skip"
    """A step whose loss or gradient norm is NaN or infinite on any rank: "skip" its update
    (weights, optimizer state and EMA untouched; counted in the metrics), "stop" the run, or
    "rollback" to the newest checkpoint and skip the data since it."""
    nonfinite_patience: int = 10
    """skip: stop after this many consecutive skipped steps; rollback: stop after this many
    rollbacks without a finite step in between."""
    host_memory: Literal["auto", "reuse", "release"] = "auto"
    """Large freed host blocks: "reuse" keeps them in the process for the next step (no page faults
    and re-zeroing of activations and expert weight gradients every step; glibc), "release" returns
    them to the OS at free (the C library's default); auto = reuse on CPU ranks, release on CUDA.
    docs/PERFORMANCE.md, "Host memory and the selector's margin"."""

    def __post_init__(self) -> None:
        _positive(self, "train", ("steps", "global_batch_size", "nonfinite_patience"))
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ConfigError("train.micro_batch_size must be positive or null")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: Optional[str] = None
    """Parquet shards: a local folder or s3://bucket/prefix (docs/DATA.md); null = the embedded
    shapes data generated on the fly."""
    on_error: Literal["raise", "skip"] = "raise"
    """A shard that cannot be read (truncated, corrupt, wrong schema): stop with an error naming it,
    or leave it out of the dataset, count it and report it in the metrics."""
    index: Literal["verify", "trust", "scan"] = "verify"
    """The dataset index (ecdit-index.json beside the shards), read by one rank and broadcast:
    verify = check it against a listing of data.path (names, sizes), trust = use it as is
    (one request at start), scan = ignore it and read every shard's footer. Without an index every
    footer is read, with a warning."""
    text_encoder: str = "tiny"
    """"tiny" (the embedded word encoder) or the path of a local T5 encoder folder
    (config.json, model.safetensors, spiece.model)."""
    text_source: Literal["auto", "online", "precomputed"] = "auto"
    """Encode captions in the training step, or read the shards' text_emb column; auto = use
    text_emb when every shard has it."""
    shuffle_window: int = 16
    """Row groups whose samples are shuffled together (after the row groups are shuffled)."""
    prefetch: int = 2
    """Steps of data loaded ahead in a background thread (0 = none)."""
    cache_row_groups: int = 64
    """Decoded row groups kept in memory per rank."""
    retries: int = 5
    """Attempts per S3 request (exponential backoff)."""
    num_samples: int = 20000
    """Embedded data: images per epoch."""
    image_size: Optional[int] = None
    """Embedded data: image side in pixels; null = 2 * model.latent_size (the toy
    VAE halves each side)."""
    seed: int = 0
    """Embedded data: seed of the image/caption generator."""

    def __post_init__(self) -> None:
        _positive(self, "data", ("num_samples", "shuffle_window", "cache_row_groups", "retries"))
        if self.prefetch < 0:
            raise ConfigError("data.prefetch must be >= 0")
        if self.image_size is not None and (self.image_size <= 0 or self.image_size % 2):
            raise ConfigError(f"data.image_size must be a positive even number or null, got {self.image_size}")


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    dp_replicate: int = 1
    """Data-parallel replicas (HSDP outer dimension)."""
    dp_shard: int = -1
    """Data-parallel shards (ZeRO-3 dimension); -1 = whatever the world size leaves."""
    tp: int = 1
    """Tensor-parallel degree for attention and dense FFNs."""
    ep: int = 1
    """Expert-parallel degree; drawn from dp_shard x tp."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend; auto (or nccl) on CUDA = "cpu:gloo,cuda:nccl" (NCCL for GPU tensors, gloo
    beside it for CPU tensors); gloo on CPU. gloo with CUDA is refused."""
    timeout_s: int = 600
    """Collective timeout: a dead peer fails the run after this long instead of hanging."""
    world_size: Optional[int] = None
    """Ranks the layout above was written for (nodes x GPUs per node); a run started on another
    world size stops before any collective. null = any world size."""
    ep_exchange: Literal["auto", "per_expert", "single"] = "auto"
    """Expert-choice all-to-all form: per_expert = one all_to_all_single per local expert,
    no copies; single = one all_to_all_single per direction with one permute copy on each
    side; auto = single on nccl (fewer, larger calls), per_expert on gloo (measured faster
    on CPU, docs/PERFORMANCE.md)."""
    sync_every_micro_batch: bool = False
    """Under gradient accumulation, reduce-scatter gradients after every micro-batch (sharded
    gradients, more communication) instead of only after the last one (one reduce-scatter per
    step; each rank holds unsharded gradients of its FSDP units until then)."""

    def __post_init__(self) -> None:
        _positive(self, "parallel", ("dp_replicate", "tp", "ep", "timeout_s"))
        if self.world_size is not None and self.world_size <= 0:
            raise ConfigError(f"parallel.world_size must be positive or null (any), got {self.world_size}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"parallel.dp_shard must be positive or -1 (auto), got {self.dp_shard}")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    interval: int = 0
    """Save every this many steps (0 = only at the end of the run)."""
    keep_last: int = 3
    """Keep the newest N committed checkpoints."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0 = none)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in run.dir when one exists."""
    async_save: bool = False
    """Write checkpoints in the background: training waits only for the copy to host memory."""
    mirror: Optional[str] = None
    """s3://bucket/prefix: upload every committed checkpoint there (sha256-verified), and resume
    from there when run.dir has no valid checkpoint."""
    verify: Literal["sha256", "size"] = "sha256"
    """How a checkpoint is checked against its manifest before resuming: every file's sha256,
    or only the sizes (faster for very large checkpoints)."""
    mirror_required: bool = True
    """A failed mirror upload stops the run (on every rank, with the cause); false: warn and
    keep training (the local checkpoint is committed either way)."""
    mirror_claim: bool = False
    """Take over a mirror prefix that holds another run's checkpoints (otherwise refused at start)."""
    allow_changes: list[str] = field(default_factory=list)
    """Keys (e.g. seed, train.global_batch_size, data.path, or a whole section such as diffusion)
    that may differ from the checkpoint being resumed although they change the trajectory."""
    timeout_s: int = 3600
    """Timeout of the CPU (gloo) process groups that checkpoint save, commit, verification and
    mirror transfers agree on; long rank-local work (hashing, uploads) is waited for there."""

    def __post_init__(self) -> None:
        if self.interval < 0 or self.keep_every < 0:
            raise ConfigError("checkpoint.interval and checkpoint.keep_every must be >= 0")
        if self.timeout_s <= 0:
            raise ConfigError(f"checkpoint.timeout_s must be positive, got {self.timeout_s}")
        if self.mirror is not None and not (self.mirror.startswith("s3://") and len(self.mirror.rstrip("/")) > 5):
            raise ConfigError(f"checkpoint.mirror must be s3://bucket/prefix, got {self.mirror!r}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    interval: int = 10
    """Write metrics every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files under run.dir/tb (needs the tensorboard package)."""
    progress: bool = True
    """Show a progress bar on the first rank."""
    timers: bool = False
    """Per-phase step timers (attention, route, dispatch/combine all-to-all, experts, FSDP
    gathers/reduce-scatters, optimizer) in ms and share of the step, as `time/...` metrics
    (CUDA events on GPU, read once per logged step; docs/PROFILING.md)."""
    routing_histograms: bool = True
    """With TensorBoard on: a histogram of experts per token for every MoE layer at every
    logged step."""

    def __post_init__(self) -> None:
        _positive(self, "logging", ("interval",))


@dataclass(kw_only=True, slots=True)
class ProfilingConfig:
    trace_steps: Optional[tuple[int, int]] = None
    """[first, last] logged step numbers (inclusive, as in metrics.jsonl) to record with
    torch.profiler: one Chrome trace per rank in run.dir/traces/ (docs/PROFILING.md)."""

    def __post_init__(self) -> None:
        if self.trace_steps is not None:
            a, b = self.trace_steps
            if not 1 <= a <= b:
                raise ConfigError(f"profiling.trace_steps must be [first, last] with 1 <= first <= last, "
                                  f"got {list(self.trace_steps)}")


@dataclass(kw_only=True, slots=True)
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: [
        "one red circle at the top left", "two blue squares at the bottom right",
        "three green triangles at the center", "one yellow square at the top right",
    ])
    """Prompts of the sample grid written at the end of training."""
    per_prompt: int = 4
    """Images per prompt in the grid."""
    steps: int = 30
    """Euler steps of the ODE sampler."""
    cfg_scale: float = 4.0
    """Classifier-free guidance scale (1 = no guidance)."""
    use_ema: bool = True
    """Sample with the EMA weights when they exist."""
    at_end: bool = True
    """Write run.dir/samples/step-N.png when training ends."""

    def __post_init__(self) -> None:
        _positive(self, "sample", ("per_prompt", "steps"))
        if self.cfg_scale < 0:
            raise ConfigError("sample.cfg_scale must be >= 0")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    dir: str = "runs/default"
    """Output folder: metrics.jsonl, checkpoints/, samples/, tb/, config.yaml."""


@dataclass(kw_only=True, slots=True)
class Config:
    seed: int = 0
    """Seed of initialisation and of every per-sample random draw."""
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self, dp: int = 1, tp: int = 1) -> None:
        """Cross-section checks for a layout with `dp` data-parallel and `tp` tensor-parallel ranks."""
        t = self.train
        if t.global_batch_size % dp:
            raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be divisible by the "
                              f"data-parallel size {dp}")
        per_rank = t.global_batch_size // dp
        micro = t.micro_batch_size or per_rank
        if per_rank % micro:
            raise ConfigError(f"train.micro_batch_size ({micro}) must divide the per-rank batch "
                              f"{per_rank} (= train.global_batch_size / data-parallel size {dp})")
        if self.moe.num_experts:
            tokens = micro * self.model.train_tokens_per_image
            if tokens % tp or (tokens // tp) % self.moe.group_size:
                raise ConfigError(
                    f"moe.group_size ({self.moe.group_size}) must divide the tokens each rank routes: "
                    f"micro batch {micro} x {self.model.train_tokens_per_image} tokens/image / tp {tp} = "
                    f"{tokens / tp:g}; valid group sizes: {_divisors(tokens // tp) if tokens % tp == 0 else 'none'}")
        if self.data.path is None and self.data.image_size not in (None, 2 * self.model.latent_size):
            raise ConfigError(f"the embedded data makes latents of data.image_size / 2 = {self.data.image_size // 2}"
                              f" but model.latent_size is {self.model.latent_size}; set data.image_size="
                              f"{2 * self.model.latent_size}")
        if self.data.path is None and self.model.in_channels != 8:
            raise ConfigError(f"the embedded data has 8 latent channels; model.in_channels is "
                              f"{self.model.in_channels}")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


# --------------------------------------------------------------------------- loading

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (optional), apply `a.b=value` overrides and the model preset, and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any], validate: bool = True) -> Config:
    raw = _deep_copy(raw)
    preset = (raw.get("model") or {}).get("preset") if isinstance(raw.get("model"), dict) else None
    if preset is not None:
        from ecdit_dist.presets import preset_sections

        base = preset_sections(preset)
        for section, values in base.items():
            user = raw.get(section) or {}
            if not isinstance(user, dict):
                raise ConfigError(f"section '{section}' must be a mapping, got {type(user).__name__}")
            raw[section] = {**values, **user}
    cfg = _build(Config, raw, "")
    if validate:
        cfg.validate()
    return cfg


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.steps=100)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    name = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{name}' must be a mapping of keys, got {type(raw).__name__} ({raw!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), fields, n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        raise ConfigError(f"unknown key '{prefix}{k}'{hint} valid keys of '{name}': {', '.join(fields)}")
    kwargs = {}
    for key, value in raw.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"'{name}': {e}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] + (" or null" if type(None) in args else ""))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} ({value!r})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {type(value).__name__} ({value!r})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {type(value).__name__} ({value!r})")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {type(value).__name__} ({value!r})")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _positive(obj: Any, section: str, names: tuple[str, ...]) -> None:
    for n in names:
        v = getattr(obj, n)
        if v <= 0:
            raise ConfigError(f"{section}.{n} must be positive, got {v}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


def _deep_copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
