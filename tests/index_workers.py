"""Rank functions for the dataset index tests (importable by spawned processes)."""

from __future__ import annotations

import collections
from contextlib import contextmanager


@contextmanager
def count_s3_requests():
    """Counts the S3 requests (by operation) that boto3 clients created inside the block send."""
    import boto3

    if boto3.DEFAULT_SESSION is None:
        boto3.setup_default_session()
    counts: collections.Counter = collections.Counter()

    def hook(event_name: str, **kw) -> None:
        counts[event_name.rsplit(".", 1)[-1]] += 1

    boto3.DEFAULT_SESSION.events.register("before-send.s3", hook)
    try:
        yield counts
    finally:
        boto3.DEFAULT_SESSION.events.unregister("before-send.s3", hook)


def start_and_train(rank: int, world: int, run_dir: str, overrides: list[str], steps: int):
    """S3 requests made while the Trainer starts, then the sample ids of every step trained."""
    from workers import QUIET, TINY

    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    seen: list[tuple[int, list]] = []

    class Recording(Trainer):
        def batch(self, step):
            out = super().batch(step)
            seen.append((step, self.last_ids.tolist()))
            return out

    cfg = load_config(TINY, [*overrides, f"run.dir={run_dir}", f"train.steps={steps}", *QUIET])
    with count_s3_requests() as counts:
        trainer = Recording(cfg)
    start = dict(counts)
    trainer.run()
    return start, seen
