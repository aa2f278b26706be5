"""The bundled demo data set: synthetic scenes with one definite question each, drawn with Pillow.

Every sample is one image at its own resolution and aspect ratio (sides about 96-384 px, aspect 1:3
to 3:1; scenes with a word are landscape, at least 3:2) with either a caption or one question whose
answer is one of at least four options, so a model that ignores the image scores at most 25%.
Question types: colour, shape, count, position, word, caption. Within each question type the answers
cycle through the options, so they are balanced to within one sample.

The output is a pure function of (seed, sizes): the same arguments give byte-identical JSON and
PNG files (Python's `random.Random` seeded with a string is stable across runs and platforms, and
Pillow writes PNGs without timestamps). A `manifest.json`, written last, makes regeneration a no-op.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 200, 0),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = ("1", "2", "3", "4")
WORDS = ("CAT", "DOG", "SUN", "MAP", "HAT", "CUP", "KEY", "PEN")
BACKGROUND = (245, 245, 245)
TEXT_COLOUR = (20, 20, 20)
QUESTION_TYPES = ("colour", "shape", "count", "position", "word", "caption")
QUESTIONS = {
    "colour": "What colour is the {shape}?",
    "shape": "What shape is shown?",
    "count": "How many shapes are there?",
    "position": "Where is the {colour} {shape}: left, right, top or bottom?",
    "word": "What word is written in the image?",
    "caption": "Describe the image in one sentence.",
}
OPTIONS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS, "position": POSITIONS, "word": WORDS}
NUMBER_WORDS = {1: "One", 2: "Two", 3: "Three", 4: "Four"}
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 96, 384, 3.0
# word scenes are landscape (w/h >= 1.5), so a three-letter word in a font 40 % of the short side fits
# and stays several 16-px patches tall at the demo's 128^2 area (a 1:3 portrait shrank it to ~1.5)
WORD_MIN_ASPECT = 1.5


def demo_corpus() -> list[str]:
    """Every question and answer phrase of the demo set (the tokenizer trains on these)."""
    lines = [q.format(shape=s, colour=c) for q in QUESTIONS.values() for s in SHAPES for c in COLOURS]
    lines += [w for opts in OPTIONS.values() for w in opts]
    lines += [f"A {c} {s} on the {p}." for c in COLOURS for s in SHAPES for p in POSITIONS]
    lines += [f"{NUMBER_WORDS[n]} {c} {s}s." for n in (2, 3, 4) for c in COLOURS for s in SHAPES]
    lines += [f'The word "{w}" written in black.' for w in WORDS]
    return lines


# ---------------------------------------------------------------------------------------- drawing


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = [-90, 30, 150]
    elif shape == "diamond":
        angles = [-90, 0, 90, 180]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: str) -> None:
    """Draw `shape` of radius `r` centred at (cx, cy)."""
    fill = COLOURS[colour]
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        # inscribed in the circle of radius r, so all shapes look about equally large
        s = r * 0.8
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    if features.check("freetype2"):
        return ImageFont.load_default(size=size)
    logger.warning("Pillow lacks FreeType; the demo words use the small bitmap font")
    return ImageFont.load_default()


def draw_word(img: Image.Image, word: str, rng: random.Random) -> None:
    """Write `word` in a font about 40% of the short side high (several 16-px patches tall)."""
    draw = ImageDraw.Draw(img)
    size = max(24, int(min(img.size) * 0.4))
    while True:
        font = _font(size)
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        fits = right - left <= img.width * 0.9 and bottom - top <= img.height * 0.9
        if fits or size <= 12:
            break
        size = int(size * 0.85)
    x = rng.uniform(0, max(0, img.width - (right - left))) - left
    y = rng.uniform(0, max(0, img.height - (bottom - top))) - top
    draw.text((round(x), round(y)), word, fill=TEXT_COLOUR, font=font)


def random_size(rng: random.Random, min_aspect: float = 1 / MAX_ASPECT) -> tuple[int, int]:
    """(width, height) with sides in [MIN_SIDE, MAX_SIDE] and log-uniform aspect (w/h) in [min_aspect, 3]."""
    aspect = math.exp(rng.uniform(math.log(min_aspect), math.log(MAX_ASPECT)))
    a = max(aspect, 1 / aspect)
    long_side = rng.uniform(max(MIN_SIDE * a, 128), MAX_SIDE)
    short = max(MIN_SIDE, round(long_side / a))
    long_side = round(long_side)
    return (long_side, short) if aspect >= 1 else (short, long_side)


def _canvas(rng: random.Random, word: bool) -> Image.Image:
    """A blank scene of a random size; landscape when it will hold a word."""
    return Image.new("RGB", random_size(rng, WORD_MIN_ASPECT if word else 1 / MAX_ASPECT), BACKGROUND)


def _position_centre(position: str, w: int, h: int) -> tuple[float, float]:
    fx, fy = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8)}[position]
    return fx * w, fy * h


def _single_shape(img: Image.Image, shape: str, colour: str, position: str | None, rng) -> None:
    w, h = img.size
    if position is None:
        cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h
        r = min(w, h) * rng.uniform(0.2, 0.3)
    else:
        cx, cy = _position_centre(position, w, h)
        # centre at 20% of the side, radius <= 15% of it: the shape stays within 5-35%, clear of the middle
        r = min(w, h) * 0.15
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, colour)


def _many_shapes(img: Image.Image, n: int, shape: str, colour: str, rng: random.Random) -> None:
    """n shapes in distinct cells of a grid laid along the long side, so they never overlap."""
    w, h = img.size
    cols, rows = (4, 1) if w >= 2 * h else (1, 4) if h >= 2 * w else (2, 2)
    cells = rng.sample(range(cols * rows), n)
    cw, ch = w / cols, h / rows
    r = min(cw, ch) * 0.3
    draw = ImageDraw.Draw(img)
    for c in sorted(cells):
        cx = (c % cols + 0.5) * cw + rng.uniform(-0.1, 0.1) * cw
        cy = (c // cols + 0.5) * ch + rng.uniform(-0.1, 0.1) * ch
        draw_shape(draw, shape, cx, cy, r, colour)


# ---------------------------------------------------------------------------------------- samples


def _scene(qtype: str, answer: str, rng: random.Random) -> tuple[Image.Image, str, str]:
    """Draw a scene for `qtype` whose true answer is `answer`; returns (image, question, answer)."""
    img = _canvas(rng, word=qtype == "word")
    shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
    if qtype == "colour":
        colour = answer
        _single_shape(img, shape, colour, rng.choice((None, *POSITIONS)), rng)
    elif qtype == "shape":
        shape = answer
        # the large central variant: a corner shape (radius 15 % of the short side) spans about two
        # patches at the demo's 128^2 area, too few to tell a star from a circle
        _single_shape(img, shape, colour, None, rng)
    elif qtype == "count":
        _many_shapes(img, int(answer), shape, colour, rng)
    elif qtype == "position":
        _single_shape(img, shape, colour, answer, rng)
    elif qtype == "word":
        draw_word(img, answer, rng)
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    return img, QUESTIONS[qtype].format(shape=shape, colour=colour), answer


def _caption_scene(k: int, rng: random.Random) -> tuple[Image.Image, str, str]:
    kind = k % 3
    img = _canvas(rng, word=kind == 2)
    shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
    if kind == 0:
        position = rng.choice(POSITIONS)
        _single_shape(img, shape, colour, position, rng)
        caption = f"A {colour} {shape} on the {position}."
    elif kind == 1:
        n = rng.choice((2, 3, 4))
        _many_shapes(img, n, shape, colour, rng)
        caption = f"{NUMBER_WORDS[n]} {colour} {shape}s."
    else:
        word = rng.choice(WORDS)
        draw_word(img, word, rng)
        caption = f'The word "{word}" written in black.'
    return img, QUESTIONS["caption"], caption


def _split_samples(split: str, n: int, seed: int, image_dir: Path) -> list[dict]:
    rng = random.Random(f"viq-demo:{seed}:{split}")
    # sample i gets type i % 6 and the (i // 6)-th option of that type: answers balanced per type
    plan = [(QUESTION_TYPES[i % len(QUESTION_TYPES)], i // len(QUESTION_TYPES)) for i in range(n)]
    rng.shuffle(plan)
    if image_dir.is_dir():
        # stale PNGs of an earlier, larger run would otherwise linger next to the new ones
        for old in image_dir.glob(f"{split}-*.png"):
            old.unlink()
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (qtype, k) in enumerate(plan):
        if qtype == "caption":
            img, question, answer = _caption_scene(k, rng)
        else:
            opts = OPTIONS[qtype]
            img, question, answer = _scene(qtype, opts[k % len(opts)], rng)
        sid = f"{split}-{i:05d}"
        img.save(image_dir / f"{sid}.png", format="PNG")
        records.append(
            {
                "id": sid,
                "image": f"images/{split}/{sid}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
                "question_type": qtype,
            }
        )
    return records


def generate_demo(
    out_dir: str | Path, *, n_train: int = 2000, n_val: int = 200, n_test: int = 200, seed: int = 0
) -> dict[str, Path]:
    """Write `out_dir/{train,val,test}.json` (LLaVA JSON) and `out_dir/images/<split>/*.png`.

    Skips all work when `out_dir/manifest.json` records the same seed and sizes.
    Returns {split: path of its JSON file}.
    """
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in sizes.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n_{split} must be a non-negative integer, got {n!r}")
    out = Path(out_dir)
    paths = {split: out / f"{split}.json" for split in SPLITS}
    manifest = {"format_version": FORMAT_VERSION, "seed": seed, "sizes": sizes}
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and all(p.is_file() for p in paths.values()):
        try:
            if json.loads(manifest_path.read_text()) == manifest:
                logger.info("demo data in %s is up to date (seed %d); skipping", out, seed)
                return paths
        except json.JSONDecodeError:
            pass
    if not manifest_path.is_file():
        # a folder the demo never wrote into may hold a user's data set: never write over it
        for path in [*paths.values(), out / "images"]:
            if path.exists():
                raise ValueError(f"{path} exists and was not written by the demo generator (no {manifest_path}); "
                                 "point the demo at an empty or a demo folder")
    # an interrupted run must not leave a manifest that vouches for partial output
    manifest_path.unlink(missing_ok=True)
    for split in SPLITS:
        records = _split_samples(split, sizes[split], seed, out / "images" / split)
        paths[split].write_text(json.dumps(records, indent=1) + "\n")
        logger.info("wrote %d demo samples to %s", len(records), paths[split])
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return paths


def prepare_recipe_data(train: str | Path, n_train: int) -> None:
    """What a recipe's ``data.demo: true`` asks for: the demo set in train's folder where it is missing.

    A ``train`` file that exists is used as it is, unless the demo wrote it (its folder holds the demo's
    manifest), in which case the set is brought to the requested size. Nothing a user wrote is replaced.
    """
    train = Path(train)
    out = train.parent
    if train.exists() and not (out / "manifest.json").is_file():
        logger.info("data.demo: %s exists and was not generated by the demo; training on it as it is", train)
        return
    if train.name != "train.json":
        raise ValueError(f"data.demo generates <folder>/train.json, but data.train is {str(train)!r}")
    generate_demo(out, n_train=n_train, n_val=max(1, n_train // 10), n_test=max(1, n_train // 10))
