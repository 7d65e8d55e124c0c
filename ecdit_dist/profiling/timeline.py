"""`ecdit profile timeline`: a one-picture view of a training trace (profiling.trace_steps).

Reads one rank's Chrome trace and draws the step's named phase ranges on one row per phase,
forward and backward alike, over time: a quick look without Perfetto (ui.perfetto.dev
opens the same file with every operator and, on GPU, every kernel).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ecdit_dist.profiling.phases import PHASES

ROW_H = 18
LEFT = 96


def phase_ranges(trace: dict) -> tuple[list[tuple[str, float, float]], float, float]:
    """(phase, start_us, end_us) of every named phase range, and the span of the step ranges."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ranges, steps = [], []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "user_annotation":
            continue
        name, t0, t1 = e.get("name", ""), float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))
        if name.startswith("step"):
            steps.append((t0, t1))
            continue
        phase = name.rsplit("/", 1)[-1].removesuffix("@bwd")
        if phase in PHASES:
            ranges.append((phase, t0, t1))
    if not steps:
        raise ValueError("the trace has no step ranges; was it written by profiling.trace_steps?")
    return ranges, min(s for s, _ in steps), max(e for _, e in steps)


def draw(trace_path: str | Path, out: str | Path, width: int = 900) -> Path:
    from PIL import Image, ImageDraw

    from ecdit_dist.profiling.plot import SERIES_COLOURS, save_png

    ranges, t0, t1 = phase_ranges(json.loads(Path(trace_path).read_text()))
    span = max(t1 - t0, 1.0)
    height = 24 + ROW_H * len(PHASES) + 30
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((4, 4), f"{Path(trace_path).name}: {span / 1000:.1f} ms", fill=(0, 0, 0))
    scale = (width - LEFT - 8) / span
    for row, phase in enumerate(PHASES):
        y = 24 + row * ROW_H
        d.text((4, y + 3), phase, fill=(0, 0, 0))
        d.line([LEFT, y + ROW_H - 1, width - 8, y + ROW_H - 1], fill=(235, 235, 235))
        colour = SERIES_COLOURS[row % len(SERIES_COLOURS)]
        for p, a, b in ranges:
            if p == phase:
                x0 = LEFT + (a - t0) * scale
                d.rectangle([x0, y + 2, max(x0 + 1, LEFT + (b - t0) * scale), y + ROW_H - 3], fill=colour)
    y = 24 + ROW_H * len(PHASES) + 6
    for k in range(5):
        x = LEFT + k * (width - LEFT - 8) / 4
        d.line([x, y, x, y + 4], fill=(0, 0, 0))
        d.text((min(x - 10, width - 60), y + 8), f"{span * k / 4 / 1000:.0f} ms", fill=(0, 0, 0))
    return save_png(img, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ecdit profile timeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="a rank's trace, e.g. runs/x/traces/steps-00000010-00000010/rank00000.json")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    try:
        path = draw(args.trace, args.out)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
