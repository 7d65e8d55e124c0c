"""Small PNG charts drawn with PIL: a log-x line chart (bandwidth against size) and a
colour scale for heatmaps. Files are written to a temporary name, then renamed."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

SERIES_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]

# viridis at 9 stops: dark blue (low) -> green -> yellow (high)
_VIRIDIS = [(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
            (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)]


def colour(value: float, vmax: float) -> tuple[int, int, int]:
    """RGB of `value` on a viridis scale from 0 to vmax (clamped)."""
    x = 0.0 if vmax <= 0 else min(max(value / vmax, 0.0), 1.0)
    pos = x * (len(_VIRIDIS) - 1)
    i = min(int(pos), len(_VIRIDIS) - 2)
    f = pos - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(int(round(a[k] + f * (b[k] - a[k]))) for k in range(3))  # type: ignore[return-value]


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if n == int(n) else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


def line_chart(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str, xlabel: str,
               ylabel: str, width: int = 640, height: int = 400) -> Path:
    """One line with point markers per series; x on a log2 axis labelled as byte sizes."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 64, 16, 28, 48
    pts = [p for s in series.values() for p in s]
    xs = [math.log2(max(x, 1.0)) for x, _ in pts] or [0.0, 1.0]
    ymax = max([y for _, y in pts] + [1e-12]) * 1.1
    x0, x1 = min(xs), max(xs)
    if x1 - x0 < 1:
        x0, x1 = x0 - 1, x1 + 1

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (math.log2(max(x, 1.0)) - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - y / ymax * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for k in range(6):                                       # y grid and labels
        y = ymax * k / 5
        _, py = to_px(1, y)
        draw.line([left, py, width - right, py], fill=(225, 225, 225))
        draw.text((4, py - 6), f"{y:.3g}", fill=(0, 0, 0))
    for e in range(math.ceil(x0), math.floor(x1) + 1):        # x ticks at powers of two
        if (e - math.ceil(x0)) % max(1, round((x1 - x0) / 8)):
            continue
        px, _ = to_px(2.0 ** e, 0)
        draw.line([px, height - bottom, px, height - bottom + 4], fill=(0, 0, 0))
        draw.text((px - 12, height - bottom + 6), human_bytes(2 ** e), fill=(0, 0, 0))
    draw.text((left, 1), title, fill=(0, 0, 0))
    draw.text((width // 2 - 60, height - 18), xlabel, fill=(0, 0, 0))
    draw.text((4, 14), ylabel, fill=(0, 0, 0))
    for i, (name, s) in enumerate(series.items()):
        c = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        s = sorted(s)
        line = [to_px(x, y) for x, y in s]
        if len(line) > 1:
            draw.line(line, fill=c, width=2)
        for px, py in line:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
        x = width - right - 90 * (len(series) - i)                      # legend in the header row
        draw.rectangle([x, 15, x + 12, 24], fill=c)
        draw.text((x + 16, 13), name, fill=(0, 0, 0))
    return save_png(img, path)
