"""Profiling: per-phase step timers and communication benchmarks."""
