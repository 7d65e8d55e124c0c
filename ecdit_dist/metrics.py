"""Metrics: one JSON object per logged step in <run.dir>/metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Only the first rank writes; other ranks get a logger whose calls do nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool, after_step: int | None = None) -> None:
        """`after_step`: the step the run (re)starts from; records of later steps (logged before a
        crash, and about to be logged again) and a torn last line are dropped first."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if after_step is not None and self.path.exists():
            self._truncate(after_step)
        self.file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("logging.tensorboard is on but the tensorboard package is not installed "
                              "(pip install tensorboard); writing metrics.jsonl only", stacklevel=2)
            else:
                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def _truncate(self, after_step: int) -> None:
        from ecdit_dist.checkpoint.manager import atomic_write_text

        text = self.path.read_text()
        kept = [line for line in _complete_lines(text) if json.loads(line).get("step", 0) <= after_step]
        new = "".join(line + "\n" for line in kept)
        if new != text:
            atomic_write_text(self.path, new)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _complete_lines(text: str) -> list[str]:
    """The JSON records of a metrics file, without a last line torn by a crash."""
    lines = [line for line in text.splitlines() if line.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return lines


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in _complete_lines(path.read_text())]
