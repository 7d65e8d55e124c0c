"""Preemption: a signal asks the run to stop; every rank stops at the same step with a checkpoint.

What schedulers send, and how long they wait before SIGKILL:

| who | signal | to whom | grace before SIGKILL |
|---|---|---|---|
| torchrun agent (it got SIGTERM/SIGINT/SIGHUP/SIGQUIT, or a signal in `--signals-to-handle`) | the same signal | every worker (each worker runs in its own session) | `--shutdown-timeout` / `TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, default 30 s |
| Slurm `scancel`, `scontrol requeue`, preemption, time limit | SIGTERM (SIGCONT first) | every process of every step (cgroup) | `KillWait`, default 30 s |
| Slurm `#SBATCH --signal=B:USR1@300` | SIGUSR1 | the batch shell only (the generated script requeues) | the 300 s before the time limit |
| Kubernetes (pod deletion, node drain, preemption) | SIGTERM | the container's main process (torchrun) | `terminationGracePeriodSeconds`, default 30 s |

The budget every one of these must cover is two training steps plus one checkpoint write.

How it works: the signal handler does nothing but note the signal (a helper thread reads the
signal numbers from `signal.set_wakeup_fd`, so this also works while the main thread sits in
a collective). Every training step carries "did this rank get a signal" as one entry of its
step report (ecdit_dist/step_report.py: one all-reduce and one host read per step, shared
with the non-finite verdict and the loss), so every rank learns at the same step that some
rank was asked to stop. The report is read after the backward pass: a signal that arrives
later in step s is seen in step s + 1's report, so the run finishes at most one more step.
The trainer then saves the step it reached (whatever `checkpoint.interval` is) and exits
with `EXIT_PREEMPTED`.

A rank in a cgroup-wide kill gets the signal twice (from the scheduler and again from the
torchrun agent); repeats within `REPEAT_WINDOW_S` of the first signal count as the same request.
A later signal exits at once with 128 + the signal number, without a checkpoint (committed
checkpoints are never touched by a half-written one; see ecdit_dist/checkpoint/manager.py).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Iterable

import torch

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". The run saved the
# step it reached; running the same command again resumes from it.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# a repeat of a signal within this many seconds of the first is the same request (cgroup kill + agent forward)
REPEAT_WINDOW_S = 3.0


class Preemption:
    """Signal flag of this rank plus the step-boundary agreement of all ranks."""

    def __init__(self, device: torch.device, distributed: bool, signals: Iterable[signal.Signals] = SIGNALS,
                 repeat_window_s: float = REPEAT_WINDOW_S) -> None:
        self.device = device
        self.distributed = distributed
        self.signals = tuple(signals)
        self.repeat_window_s = repeat_window_s
        self.signal_name: str | None = None      # the first signal this rank got
        self.first_at: float | None = None
        self.stopped = False                     # all ranks agreed to stop
        self._installed = False
        self._previous: dict[int, object] = {}

    # ------------------------------------------------------------------ signals
    def install(self) -> "Preemption":
        """Route the signals to this object (main thread only; a no-op elsewhere)."""
        if self._installed or threading.current_thread() is not threading.main_thread():
            return self
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        try:
            old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except ValueError:
            reader.close()
            writer.close()
            return self
        if old_fd != -1:           # someone else owns the wakeup fd (an event loop): leave it to them
            signal.set_wakeup_fd(old_fd)
            reader.close()
            writer.close()
            return self
        self._sockets = (reader, writer)
        for sig in self.signals:
            # the Python-level handler is empty; the C-level handler writes the number to the wakeup fd
            self._previous[sig] = signal.signal(sig, _noop)
        threading.Thread(target=self._watch, args=(reader,), name="preemption-signals", daemon=True).start()
        self._installed = True
        return self

    def _watch(self, reader: socket.socket) -> None:
        wanted = {int(s) for s in self.signals}
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in wanted:
                    self.notice(signal.Signals(signum))

    def notice(self, sig: signal.Signals) -> None:
        """A signal arrived: the first asks for a checkpoint-and-stop, a later one exits now."""
        now = time.monotonic()
        rank = os.environ.get("RANK", "0")
        if self.first_at is None:
            self.first_at, self.signal_name = now, sig.name
            print(f"rank {rank}: got {sig.name}; saving a checkpoint after this step (or the next) and stopping "
                  f"(send it again to exit at once)", file=sys.stderr, flush=True)
        elif now - self.first_at > self.repeat_window_s:
            print(f"rank {rank}: got {sig.name} again; exiting now without a checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(128 + int(sig))

    @property
    def requested(self) -> bool:
        return self.first_at is not None

    def uninstall(self) -> None:
        if not self._installed:
            return
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        signal.set_wakeup_fd(-1)
        for s in self._sockets:
            s.close()
        self._installed = False

    # ------------------------------------------------------------------ agreement
    def settle(self, any_rank_requested: bool) -> bool:
        """Take the all-rank verdict of a step report (the same value on every rank); sticky."""
        self.stopped = self.stopped or bool(any_rank_requested)
        return self.stopped


def _noop(signum, frame) -> None:
    """Installed so that the C-level handler runs (and writes to the wakeup fd); the thread acts."""
