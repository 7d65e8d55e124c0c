"""Profiling inside `ecdit train`: per-phase step timers (`logging.timers`), torch.profiler
Chrome traces of chosen steps (`profiling.trace_steps`) and routing histograms in
TensorBoard (`logging.routing_histograms`). The training loop calls begin() / end() around
every step and metrics() / log_histograms() when it logs; everything else is hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ecdit_dist.profiling.phases import PhaseTimer, instrument, metrics


def experts_per_token(rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """How many experts took each token: rows (E, G*C) flat token indices -> (num_tokens,) counts."""
    return torch.bincount(rows.reshape(-1), minlength=num_tokens)


class TrainingProfiler:
    def __init__(self, cfg, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                 device: torch.device, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.timers = cfg.logging.timers
        self.trace_steps = cfg.profiling.trace_steps
        self.histograms = cfg.logging.routing_histograms and cfg.logging.tensorboard
        self.timer = PhaseTimer(device)
        self._profiler = None
        self._capture = False
        self._rf = None
        self._last = 0
        self._counts: dict[str, torch.Tensor] = {}
        names = {m: f"layer{i}" for i, b in enumerate(getattr(model, "blocks", [])) for m in b.modules()}
        self._names = names
        if self.timers or self.trace_steps or self.histograms:
            instrument(model, self.timer, optimizer, self._observe if self.histograms else None,
                       timing=bool(self.timers or self.trace_steps))

    # ------------------------------------------------------------------ routing
    def _observe(self, layer: nn.Module, rows: torch.Tensor, num_tokens: int) -> None:
        if self._capture:
            self._counts[self._names.get(layer, "moe")] = experts_per_token(rows.detach(), num_tokens)

    def _is_logged(self, number: int) -> bool:
        return number % self.cfg.logging.interval == 0 or number == self.cfg.train.steps

    # ------------------------------------------------------------------ steps
    def begin(self, step: int) -> None:
        """Before the step with 0-based index `step` (logged as step + 1)."""
        number = step + 1
        tracing = bool(self.trace_steps) and self.trace_steps[0] <= number <= self.trace_steps[1]
        if tracing and self._profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
            self._trace_first = number
        self.timer.trace = self._profiler is not None
        self._capture = self.histograms and self._is_logged(number)
        if self.timers or self._profiler is not None:
            self.timer.begin_step()
            self._rf = torch.profiler.record_function(f"step{number}") if self._profiler is not None else None
            if self._rf is not None:
                self._rf.__enter__()

    def end(self, step: int) -> None:
        number = step + 1
        if self.timer.active:
            if self._rf is not None:
                self._rf.__exit__(None, None, None)
                self._rf = None
            self.timer.end_step()
            if not self.timers:
                self.timer.collect()                        # trace only: drop the marks
        self._capture = False
        self._last = number
        if self._profiler is not None and number >= self.trace_steps[1]:
            self._finish_trace(number)

    def trace_path(self, first: int, last: int) -> Path:
        return self.run_dir / "traces" / f"steps-{first:08d}-{last:08d}" / f"rank{self.rank:05d}.json"

    def _finish_trace(self, last: int) -> None:
        prof, self._profiler = self._profiler, None
        self.timer.trace = False
        prof.stop()
        path = self.trace_path(self._trace_first, last)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        prof.export_chrome_trace(str(tmp))
        tmp.replace(path)
        if self.rank == 0:
            print(f"wrote traces of steps {self._trace_first}-{last} to {path.parent}", flush=True)

    # ------------------------------------------------------------------ logging
    def metrics(self) -> dict[str, float]:
        """Mean `time/...` metrics of the steps since the last call (empty with timers off)."""
        return metrics(self.timer.collect()) if self.timers else {}

    def log_histograms(self, logger: Any, number: int) -> None:
        tb = getattr(logger, "tb", None)
        if tb is not None:
            for name, counts in self._counts.items():
                tb.add_histogram(f"moe/{name}/experts_per_token", counts.float().cpu(), number)
        self._counts = {}

    def close(self) -> None:
        """End a trace the run stopped inside of."""
        if self._profiler is not None:
            self._finish_trace(self._last)
