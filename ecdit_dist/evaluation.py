"""A mini-GenEval for the embedded shapes data: detect shapes in decoded images, score prompts.

GenEval (Ghosh et al., 2023) scores text-to-image alignment with an object detector per
prompt category and reports the mean over categories. The shapes grammar ("two red
circles at the top left") is simple enough to detect procedurally, with no learned model:

* detect: each pixel is explained as a blend `alpha * colour + (1 - alpha) * background`
  of one palette colour (least-squares alpha, smallest residual wins); pixels with alpha
  >= 0.5 are foreground, grouped into 4-connected components of one colour; each component
  is classified as circle, square or triangle by fitting the three shapes' anti-aliased
  templates (size from the component's area, centre from its centroid) and keeping the
  best fit; a component holding two touching shapes of one colour is split in two
  when two templates explain it much better than one.
* score: the grammar names one shape kind, one colour, a count and a position, so GenEval's
  categories become:

  single_object (count-1 prompts)  at least one object of the named shape
  two_objects (count-2 prompts)    at least two objects of the named shape
  counting (all)                   exactly N objects of the named shape
  colours (all)                    >= 1 object of the named shape, all of the named colour
  position (all)                   >= 1 object of the named shape, and their mean centre is
                                   nearest to the named position's anchor
  colour_attribution (all)         exactly N objects in the image, all of the named shape AND
                                   colour: colour bound to the right objects, nothing else drawn

  overall = mean over the six categories (GenEval's definition). `full_prompt` (every
  attribute right at once) is reported too, outside the mean.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecdit_dist.data.shapes import BACKGROUND, COLOURS, COUNT_WORDS, POSITIONS, SHAPES, Scene, render, scene

CATEGORIES = ("single_object", "two_objects", "counting", "colours", "position", "colour_attribution")
EVAL_SEED = 7919          # prompt seed of `ecdit eval`, apart from the training data's default seed 0
_PALETTE = np.array([COLOURS[c] for c in COLOURS], dtype=np.float64)          # (K, 3)
_NAMES = list(COLOURS)
_BG = np.array(BACKGROUND, dtype=np.float64)
_WORD_COUNTS = {w: n for n, w in COUNT_WORDS.items()}
_CAPTION = re.compile(r"^(\w+) (\w+) (\w+?)s? at the (.+)$")


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    y: float          # centre as a fraction of the side (0 = top)
    x: float          # (0 = left)
    area: float       # soft area in pixels


def parse_caption(caption: str) -> Scene:
    """"two red circles at the top left" -> Scene(2, "red", "circle", "top left")."""
    m = _CAPTION.match(caption.strip())
    if not m or m[1] not in _WORD_COUNTS or m[2] not in COLOURS or m[3] not in SHAPES or m[4] not in POSITIONS:
        raise ValueError(f"caption {caption!r} is not of the shapes grammar "
                         f"('<{'|'.join(_WORD_COUNTS)}> <colour> <shape>[s] at the <position>')")
    return Scene(count=_WORD_COUNTS[m[1]], colour=m[2], shape=m[3], position=m[4])


# ---------------------------------------------------------------- detection

def _alpha_map(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) in [0, 1] -> coverage alpha (H, W) and palette index (H, W) of each pixel."""
    d = img.transpose(1, 2, 0).astype(np.float64) - _BG                 # (H, W, 3)
    v = _PALETTE - _BG                                                   # (K, 3)
    alpha = np.clip(d @ v.T / (v * v).sum(1), 0.0, 1.0)                  # (H, W, K)
    resid = ((d[..., None, :] - alpha[..., None] * v) ** 2).sum(-1)      # (H, W, K)
    best = resid.argmin(-1)                                              # (H, W)
    return np.take_along_axis(alpha, best[..., None], -1)[..., 0], best


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean (H, W) mask, as pixel lists."""
    H, W = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        comp, queue = [], deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(comp)
    return out


def shape_coverage(shape: str, cy: float, cx: float, r: float, H: int, W: int, ss: int = 4) -> np.ndarray:
    """(H, W) fraction of each pixel covered by a shape of the grammar with centre (cy, cx) and
    size r in pixels, with the geometry of `render` (supersampled ss x ss)."""
    yy, xx = np.mgrid[0:H * ss, 0:W * ss].astype(np.float64)
    yy, xx = (yy + 0.5) / ss, (xx + 0.5) / ss
    if shape == "circle":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif shape == "square":
        inside = (np.abs(yy - cy) <= 0.85 * r) & (np.abs(xx - cx) <= 0.85 * r)
    else:
        top, base = cy - r, cy + 0.8 * r
        inside = (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= r * (yy - top) / (base - top))
    return inside.reshape(H, ss, W, ss).mean(axis=(1, 3))


_AREA = {"circle": math.pi, "square": 1.7 ** 2, "triangle": 1.8}       # area / r^2
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 0.2}         # (centroid - centre) / r


def _fit(patch: np.ndarray, oy: int, ox: int, k: int) -> tuple[float, list[tuple[str, float, float, float]]]:
    """Best fit of `k` same-shape templates to a soft patch at offset (oy, ox): (error, fits)."""
    h, w = patch.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    mass = patch.sum()
    if k == 1:
        parts = [(patch, mass)]
    else:   # cut the patch in two across its principal axis, through its centroid
        cy, cx = (patch * ys).sum() / mass, (patch * xs).sum() / mass
        cov = np.cov(np.stack([ys.ravel(), xs.ravel()]), aweights=patch.ravel() + 1e-12)
        axis = np.linalg.eigh(cov)[1][:, -1]
        side = (ys - cy) * axis[0] + (xs - cx) * axis[1] > 0
        parts = [(patch * side, (patch * side).sum()), (patch * ~side, (patch * ~side).sum())]
        if min(p[1] for p in parts) < 1.0:
            return math.inf, []
    best_err, best = math.inf, []
    for shape in SHAPES:
        params = []
        for part, m in parts:
            r = math.sqrt(m / _AREA[shape])
            py, px = (part * ys).sum() / m, (part * xs).sum() / m
            params.append([py - _CENTROID_DY[shape] * r, px, r])
        templates = [shape_coverage(shape, *p, h, w) for p in params]
        # refine each part in turn on a small grid of sub-pixel shifts and sizes (coordinate descent)
        for j, (cy, cx, r) in enumerate(params):
            rest = np.max(templates[:j] + templates[j + 1:], axis=0) if k > 1 else np.zeros_like(patch)
            err, pick = math.inf, None
            for dy, dx, f in itertools.product(_SHIFTS, _SHIFTS, _SCALES):
                t = shape_coverage(shape, cy + dy, cx + dx, r * f, h, w)
                e = float(((np.maximum(rest, t) - patch) ** 2).sum())
                if e < err:
                    err, pick = e, (t, [cy + dy, cx + dx, r * f])
            templates[j], params[j] = pick
        err = float(((np.max(templates, axis=0) - patch) ** 2).sum())
        if err < best_err:
            best_err = err
            best = [(shape, oy + cy + _CENTROID_DY[shape] * r, ox + cx, _AREA[shape] * r * r) for cy, cx, r in params]
    return best_err, best


_SHIFTS = (-0.3, 0.0, 0.3)
_SCALES = (0.9, 1.0, 1.1)


def detect(image: np.ndarray, min_area: float = 2.0) -> list[Detection]:
    """Shapes in one RGB image (3, H, W) with values in [0, 1]."""
    H, W = image.shape[1:]
    alpha, label = _alpha_map(image)
    found = []
    for comp in _components(alpha >= 0.5):
        ys, xs = np.array(comp).T
        colour = int(np.bincount(label[ys, xs], weights=alpha[ys, xs]).argmax())
        # soft patch: the component grown by 2 pixels, alpha of pixels explained by its colour
        y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, H)
        x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, W)
        near = np.zeros((H, W), dtype=bool)
        near[ys, xs] = True
        for _ in range(2):
            grown = near.copy()
            grown[1:] |= near[:-1]; grown[:-1] |= near[1:]; grown[:, 1:] |= near[:, :-1]; grown[:, :-1] |= near[:, 1:]
            near = grown & ((alpha < 0.5) | near)
        patch = np.where(near & (label == colour), alpha, 0.0)[y0:y1, x0:x1]
        if patch.sum() < min_area:
            continue
        err1, fits1 = _fit(patch, y0, x0, 1)
        err2, fits2 = _fit(patch, y0, x0, 2)
        fits = fits2 if err2 < 0.5 * err1 else fits1
        for shape, cy, cx, m in fits:
            found.append(Detection(shape=shape, colour=_NAMES[colour], y=cy / H, x=cx / W, area=float(m)))
    return found


# ---------------------------------------------------------------- scoring

def nearest_position(y: float, x: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - y) ** 2 + (POSITIONS[p][1] - x) ** 2)


def score_prompt(prompt: Scene, found: list[Detection]) -> dict[str, bool | None]:
    """Each category's verdict for one prompt; None where the category does not apply."""
    match = [d for d in found if d.shape == prompt.shape]
    at = None
    if match:
        at = nearest_position(sum(d.y for d in match) / len(match), sum(d.x for d in match) / len(match))
    out = {
        "single_object": len(match) >= 1 if prompt.count == 1 else None,
        "two_objects": len(match) >= 2 if prompt.count == 2 else None,
        "counting": len(match) == prompt.count,
        "colours": bool(match) and all(d.colour == prompt.colour for d in match),
        "position": at == prompt.position,
        "colour_attribution": len(found) == prompt.count and all(
            d.shape == prompt.shape and d.colour == prompt.colour for d in found),
    }
    out["full_prompt"] = out["colour_attribution"] and out["position"]
    return out


def aggregate(verdicts: list[dict[str, bool | None]], weights: list[float] | None = None) -> dict:
    """Per-category accuracy (and the prompts it covers), overall = mean over CATEGORIES."""
    weights = weights or [1.0] * len(verdicts)
    scores, counts = {}, {}
    for cat in (*CATEGORIES, "full_prompt"):
        pairs = [(v[cat], w) for v, w in zip(verdicts, weights) if v[cat] is not None]
        total = sum(w for _, w in pairs)
        scores[cat] = sum(w for ok, w in pairs if ok) / total if total else None   # None: no such prompt
        counts[cat] = len(pairs)
    present = [scores[c] for c in CATEGORIES if scores[c] is not None]
    overall = float(np.mean(present)) if present else None
    return {"overall": overall, "categories": {c: scores[c] for c in CATEGORIES},
            "full_prompt": scores["full_prompt"], "prompts_per_category": counts, "prompts": len(verdicts)}


def evaluate(images: np.ndarray, captions: list[str]) -> dict:
    """Score images (B, 3, H, W) in [0, 1] against their captions."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    scenes = [parse_caption(c) for c in captions]
    return aggregate([score_prompt(s, detect(img)) for s, img in zip(scenes, images)])


def ideal_detections(s: Scene) -> list[Detection]:
    """What a perfect detector reports for a render of `s` (objects at the position's anchor)."""
    y, x = POSITIONS[s.position]
    return [Detection(s.shape, s.colour, y, x, 1.0)] * s.count


def chance_levels() -> dict:
    """Expected scores of a perfect detector when each image is paired with an independent
    prompt of the grammar: every (prompt, image) pair of the uniform grammar, weighted equally."""
    grammar = [Scene(n, c, s, p) for n, c, s, p in itertools.product(COUNT_WORDS, COLOURS, SHAPES, POSITIONS)]
    verdicts = [score_prompt(p, ideal_detections(i)) for p in grammar for i in grammar]
    return aggregate(verdicts)


def grammar_prompts(n: int, seed: int = EVAL_SEED) -> list[Scene]:
    """`n` prompts drawn from the grammar, a pure function of (seed, i)."""
    return [scene(seed, i)[0] for i in range(n)]


def render_prompts(n: int, size: int, seed: int = EVAL_SEED) -> tuple[np.ndarray, list[str]]:
    """Ground-truth renders (n, 3, size, size) in [0, 1] and their captions."""
    imgs, caps = [], []
    for i in range(n):
        s, rng = scene(seed, i)
        imgs.append(render(s, rng, size))
        caps.append(s.caption)
    return np.stack(imgs), caps


def derange(n: int, seed: int) -> np.ndarray:
    """A random permutation of range(n) with no fixed point (n >= 2)."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


# ---------------------------------------------------------------- CLI

def format_table(result: dict, chance: dict | None = None) -> str:
    lines = [f"{'category':<20}{'score':>8}{'prompts':>9}" + (f"{'chance':>9}" if chance else "")]
    rows = [(c, result["categories"][c], result["prompts_per_category"][c],
             chance["categories"][c] if chance else None) for c in CATEGORIES]
    rows.append(("overall", result["overall"], result["prompts"], chance["overall"] if chance else None))
    rows.append(("(full_prompt)", result["full_prompt"], result["prompts_per_category"]["full_prompt"],
                 chance["full_prompt"] if chance else None))
    for name, s, n, ch in rows:
        value = "-" if s is None else f"{s:.3f}"
        lines.append(f"{name:<20}{value:>8}{n:>9}" + (f"{ch:>9.3f}" if ch is not None else ""))
    return "\n".join(lines)


def _write_json(path: str, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def _cmd_eval(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (not args.renders):
        print("error: give either --checkpoint RUN_DIR (score generated images) or --renders "
              "(score ground-truth renders, to validate the evaluator)", file=sys.stderr)
        return 2
    if args.shuffle and args.prompts < 2:
        print("error: --shuffle needs --prompts >= 2", file=sys.stderr)
        return 2
    info: dict = {"prompts": args.prompts, "prompt_seed": args.prompt_seed}
    if args.renders:
        images, captions = render_prompts(args.prompts, args.size, args.prompt_seed)
        info.update(source="renders", image_size=args.size)
        if args.through_vae:   # the ceiling of a perfect model: the toy VAE keeps 8 of 12 coefficients
            import torch

            from ecdit_dist.data.shapes import ShapesSource

            vae = ShapesSource(256, args.size, 0).vae
            x = torch.from_numpy(images) * 2 - 1
            images = ((vae.decode(vae.encode(x)) + 1) / 2).numpy()
            info["through_vae"] = True
    else:
        import torch

        from ecdit_dist.inference import load_for_sampling
        from ecdit_dist.sample import generate

        bundle = load_for_sampling(args.checkpoint, use_ema=not args.no_ema, device=args.device,
                                   precision=args.precision)
        steps = args.steps or bundle.cfg.sample.steps
        scale = bundle.cfg.sample.cfg_scale if args.cfg_scale is None else args.cfg_scale
        captions = [s.caption for s in grammar_prompts(args.prompts, args.prompt_seed)]
        chunks = []
        for start in range(0, len(captions), args.batch_size):
            emb, mask = bundle.text_encoder.encode(captions[start:start + args.batch_size])
            # noise keyed by the global index, so results do not depend on --batch-size
            lat = generate(bundle.model, emb, mask, steps, scale, args.seed * 1_000_003 + start,
                           bundle.autocast_dtype)
            chunks.append(bundle.decode(lat))
            print(f"generated {min(start + args.batch_size, len(captions))}/{len(captions)}", file=sys.stderr)
        decoded = torch.cat(chunks)                                              # (B, 3, H, W) in [-1, 1]
        images = ((decoded.float().clamp(-1, 1) + 1) / 2).numpy()
        info.update(source="model", checkpoint=str(bundle.checkpoint), steps=steps, cfg_scale=scale,
                    seed=args.seed, ema=not args.no_ema, image_size=int(images.shape[-1]))
    if args.shuffle:
        captions = [captions[j] for j in derange(len(captions), args.prompt_seed)]
        info["shuffled_captions"] = True
    result = evaluate(images, captions)
    chance = chance_levels()
    out = {**result, "chance": {"overall": chance["overall"], "categories": chance["categories"]}, "setup": info}
    if args.json and args.json != "-":
        _write_json(args.json, out)
    if args.json == "-" or args.print_json:
        print(json.dumps(out, indent=1, allow_nan=False))
    else:
        print(format_table(result, chance))
    return 0


def add_eval_parser(sub) -> None:
    e = sub.add_parser(
        "eval", help="mini-GenEval: score generated images against the shapes grammar's prompts",
        description="Generate one image per prompt of the shapes grammar (count, colour, shape, position), "
                    "detect the shapes procedurally (colour segmentation, connected components, template "
                    "fit) and score GenEval's categories: single object, two objects, counting, colours, "
                    "position, colour attribution; overall = their mean. --renders scores ground-truth "
                    "renders instead (near 1.0), --shuffle pairs images with other prompts (near chance).")
    e.add_argument("--checkpoint", help="a run folder (its newest valid checkpoint) or a checkpoints/step-N folder")
    e.add_argument("--renders", action="store_true", help="score ground-truth renders (validates the evaluator)")
    e.add_argument("--through-vae", action="store_true",
                   help="with --renders: pass the renders through the toy VAE first (a perfect model's ceiling)")
    e.add_argument("--shuffle", action="store_true", help="pair every image with another image's prompt")
    e.add_argument("--prompts", type=_positive, default=200, help="prompts to score (default 200)")
    e.add_argument("--prompt-seed", type=int, default=EVAL_SEED, help=f"seed of the prompts (default {EVAL_SEED})")
    e.add_argument("--steps", type=_positive, default=None, help="Euler steps (default: the run's sample.steps)")
    e.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the run's)")
    e.add_argument("--seed", type=int, default=0, help="noise seed")
    e.add_argument("--batch-size", type=_positive, default=64, help="prompts generated together (default 64)")
    e.add_argument("--size", type=_positive, default=32, help="image side of --renders (default 32)")
    e.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    e.add_argument("--device", default="auto", help="auto (a GPU when CUDA is available, else the CPU), cpu, cuda:N")
    e.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto = bf16 autocast on a GPU, fp32 on the CPU")
    e.add_argument("--json", metavar="FILE",
                   help="write the scores as JSON to FILE ('-' = stdout instead of the table)")
    e.add_argument("--print-json", action="store_true", help="print JSON instead of the table")
    e.set_defaults(func=_cmd_eval)


def _positive(text: str) -> int:
    from ecdit_dist.cli import positive_int

    return positive_int(text)


__all__ = ["CATEGORIES", "Detection", "aggregate", "chance_levels", "detect", "evaluate", "parse_caption",
           "render_prompts", "score_prompt", "shape_coverage"]
