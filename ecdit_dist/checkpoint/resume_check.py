"""What may change when a run resumes from a checkpoint, and the run's config history.

Config keys fall in four kinds:

- architecture (model shapes, expert count, router kind): a checkpoint only loads into the same
  network; a difference is refused (use `ecdit convert` or another run.dir).
- trajectory (seed, global batch, data, diffusion, optimizer kind, ...): the run would go on but
  not as the run that was saved; refused with the list of differences unless each one is named
  in `checkpoint.allow_changes`.
- training phase (`model.mask_ratio`, `moe.group_size`, `moe.eval_group_size`,
  `moe.capacity_factor`, `moe.token_capacity_factor`, `moe.aux_loss_weight`): change freely, e.g.
  masked pretraining followed by unmasked fine-tuning (configs/phases/); reported.
- everything else (steps, lr schedule, logging, checkpointing, layout, sampling): free.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ecdit_dist.config import ConfigError

PHASE_KEYS = ("model.mask_ratio", "moe.group_size", "moe.eval_group_size", "moe.capacity_factor",
              "moe.token_capacity_factor", "moe.aux_loss_weight")
# the model and moe sections are architecture, except the phase keys and declared-only sizes
NOT_ARCHITECTURE = set(PHASE_KEYS) | {"model.frozen_text_encoder_params", "model.frozen_vae_params", "moe.top_k"}
TRAJECTORY_KEYS = (
    "seed", "train.global_batch_size", "data.path", "data.fingerprint", "data.text_encoder", "data.text_source",
    "data.shuffle_window", "data.num_samples", "data.image_size", "data.seed", "diffusion", "optim.name",
    "moe.top_k",
)


def _get(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _allowed(key: str, allow: list[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allow)


def compare(saved: dict[str, Any], now: dict[str, Any], saved_fingerprint: Any, fingerprint: Any,
            folder: Path, allow: list[str]) -> list[str]:
    """Raise ConfigError listing what may not change; return the phase changes (for the log)."""
    valid = set(TRAJECTORY_KEYS) | {k.split(".")[0] for k in TRAJECTORY_KEYS}
    unknown = [a for a in allow if a not in valid and not any(k.startswith(a + ".") for k in TRAJECTORY_KEYS)
               and not any(a.startswith(k + ".") for k in TRAJECTORY_KEYS)]
    if unknown:
        raise ConfigError(f"checkpoint.allow_changes names {', '.join(unknown)}, which are not trajectory keys; "
                          f"valid: {', '.join(TRAJECTORY_KEYS)}")
    arch = [f"{s}.{k}: checkpoint {saved[s].get(k)!r}, now {now[s][k]!r}"
            for s in ("model", "moe") if s in saved for k in now[s]
            if f"{s}.{k}" not in NOT_ARCHITECTURE and k in saved[s] and saved[s][k] != now[s][k]]
    if arch:
        raise ConfigError(f"cannot resume {folder}: the architecture differs ({'; '.join(arch)}); use another "
                          f"run.dir, set checkpoint.resume=false, or convert the weights (ecdit convert)")
    diffs = []
    for key in TRAJECTORY_KEYS:
        if key == "data.fingerprint":
            old, new = saved_fingerprint, fingerprint
            if old is None:          # not recorded by the checkpoint: nothing to compare
                continue
        else:
            old, new = _get(saved, key), _get(now, key)
            if old is None and _get(saved, key.split(".")[0]) is None:
                continue             # a section the checkpoint did not record (e.g. an imported one)
        if old != new and not _allowed(key, allow):
            diffs.append((key, old, new))
    if diffs:
        lines = "\n".join(f"  {k}: checkpoint {o!r}, now {n!r}" for k, o, n in diffs)
        keys = ",".join(k for k, _, _ in diffs)
        raise ConfigError(f"cannot resume {folder}: these settings differ from the checkpoint and change the "
                          f"training trajectory:\n{lines}\nTo continue anyway, add --set "
                          f"checkpoint.allow_changes=[{keys}]; or use another run.dir, or checkpoint.resume=false")
    return [f"{k}: {_get(saved, k)!r} -> {_get(now, k)!r}" for k in PHASE_KEYS
            if _get(saved, k) is not None and _get(saved, k) != _get(now, k)]


def write_run_config(run_dir: Path, text: str, step: int) -> None:
    """run.dir/config.yaml, written atomically; a different earlier one moves to config-history/."""
    from ecdit_dist.checkpoint.manager import atomic_write_text

    path = Path(run_dir) / "config.yaml"
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        old = path.read_text()
        if old == text:
            return
        history = run_dir / "config-history"
        history.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = history / f"config-until-step-{step:08d}-{stamp}.yaml"
        n = 1
        while target.exists():
            n += 1
            target = history / f"config-until-step-{step:08d}-{stamp}-{n}.yaml"
        atomic_write_text(target, old)
    atomic_write_text(path, text)
