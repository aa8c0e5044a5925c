"""The toy world: a deterministic generator of small scenes and MMEdit-style edit data.

No real images or weights exist offline, so the tool ships its own world that a tiny
vision-language model can learn from pixels in minutes on a CPU:

- a scene is (shape, colour, count, tint): 1-3 copies of one big saturated shape on one of
  twelve light, barely coloured backgrounds, never overlapping (`Scene`, `draw_scene`). The
  tint is an identity attribute no question asks about: it multiplies the distinct scenes
  (4 shapes x 6 colours x 3 counts x 12 tints = 864) so edits and locality probes can be
  about different scenes;
- three question types (colour, shape, count), four lower-case paraphrases each, one-word
  answers (`QUESTIONS`, `Scene.answer`);
- a seeded table of invented text facts ("what is the capital of zorvia" -> "mippel") for text
  locality (`text_facts`);
- `generate_toyworld` writes PNGs plus `train.json` / `eval.json` in the exact MMEdit schema
  (11 string fields), `pretrain.json` for teaching a backbone the world, `scenes.json` (the
  attributes of every image, for checks) and `manifest.json` (written last);
- lifelong-editing guarantees, per split (`train.json`, `eval.json` separately): a seeded
  shuffle partitions the scene space into edit scenes (`EDIT_FRACTION`) and locality scenes;
  every edit record's (scene, question type) pair is unique in its split, so no two edits of a
  split overlap or contradict, even when all of them stay applied (lifelong mode); `m_loc`
  images show locality scenes only, which no record of the split edits, and an `m_loc` probe is
  never a look-alike (same shape, colour and count) of an edit within `CHUNK_WINDOW` records asked
  that edit's question type (it would be an image rephrase of the edit but for the background
  tint, which the edit should change, not keep). Any `CHUNK_WINDOW`
  consecutive records also differ in (shape, colour, count, question type), i.e. even ignoring
  the tint, as far as the pool allows: always at the default sizes (2000 / 500); only a split
  filled to within a few percent of `max_edit_records()` gets a few exceptions near its end;
- pretraining images cycle through every scene of both pools, so a backbone knows them all;
- `ensure_toyworld` generates once into a temporary sibling folder and renames it into place,
  reusing a folder whose manifest matches the arguments.

Prompt conventions (the same as the E-VQA reader's templates):
- `src`, `rephrase`, `m_loc_q` are bare questions; the reader appends `VQA_SUFFIX`
  (" The answer is:").
- `loc` is "nq question: <question>" with no "?"; the reader appends `TEXT_LOC_SUFFIX` ("?").
- `pretrain.json` prompts are the FINAL strings a model sees at evaluation, i.e. with those
  suffixes already applied (`vqa_prompt`, `text_prompt`). Targets carry no leading space.

Everything is a pure function of the arguments: two runs give byte-identical files.

This module is generator version 3, the default. Version 4 (`world_v4.py`, `version=4` /
`--version 4`) is shaped like the real benchmarks for 1,000-edit lifelong runs (docs/LIFELONG.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from utils.errors import UserError
from utils.io import folder_atomic

TOYWORLD_VERSION = 3
"""Bump whenever the generated content changes, so old folders are regenerated."""

GENERATOR_NAME = "liveedit-toyworld"

SHAPES = ("circle", "square", "triangle", "cross")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 50, 190),
}

COUNT_WORDS = ("one", "two", "three")

# Light, clearly non-saturated backgrounds (saturation <= 0.17, every pair >= 18 apart in RGB,
# every one >= 150 from every object colour). Two lightness levels x six hues.
TINTS: dict[str, tuple[int, int, int]] = {
    "grey": (205, 205, 205),
    "blue-grey": (186, 198, 220),
    "beige": (220, 208, 184),
    "green-grey": (188, 210, 190),
    "rose-grey": (218, 192, 198),
    "lavender": (206, 190, 224),
    "pale-grey": (230, 230, 230),
    "pale-blue": (210, 224, 242),
    "pale-sand": (240, 232, 206),
    "pale-mint": (210, 236, 216),
    "pale-pink": (242, 218, 222),
    "pale-lilac": (228, 214, 244),
}

BACKGROUND = TINTS["grey"]  # the default tint (version 1 drew every scene on it)

QUESTION_TYPES = ("color", "shape", "count")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": (
        "what color is the shape?",
        "which colour does the object have?",
        "name the color of the shape.",
        "what is the colour of the objects?",
    ),
    "shape": (
        "what shape is shown?",
        "which shape do you see?",
        "name the shape in the picture.",
        "what kind of shape is drawn?",
    ),
    "count": (
        "how many shapes are there?",
        "what is the number of objects?",
        "count the shapes in the picture.",
        "how many objects are drawn?",
    ),
}

ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
}

VQA_SUFFIX = " The answer is:"
TEXT_LOC_SUFFIX = "?"
TEXT_LOC_PREFIX = "nq question: "

MMEDIT_FIELDS = (
    "src", "pred", "rephrase", "alt", "image", "image_rephrase",
    "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a",
)

# Independent random streams: train / eval / pretrain / facts never share draws.
_STREAM_TRAIN, _STREAM_EVAL, _STREAM_PRETRAIN, _STREAM_FACTS = 1, 2, 3, 4

EDIT_FRACTION = 0.8
"""Share of the scene space (per split, seeded shuffle) that edit records may show; the rest is
the split's locality pool (`m_loc` images)."""

CHUNK_WINDOW = 100
"""Consecutive records that, where the pool allows, never repeat (shape, colour, count, question
type): an evaluation chunk of up to this many edits holds no two look-alike edits."""

_SUPERSAMPLE = 4  # draw at 4x and box-downsample: smooth, deterministic edges
_SIZE_FRACTION = 0.36  # nominal object size (bounding box side) / image side
_REDRAW_SCALE = (0.9, 1.1)  # a redraw scales each object by a random factor in this range
_NOISE_STD = 6.0  # pixel noise of a redraw, on the 0-255 scale
_MIN_IMAGE_SIZE = 24


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Scene:
    """What an image shows: `count` copies of one `shape` in one `color` on background `tint`.

    No question asks about the tint; it is part of the scene's identity (redraws keep it).
    """

    shape: str
    color: str
    count: int
    tint: str = "grey"

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise UserError(f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        if self.color not in COLORS:
            raise UserError(f"unknown colour {self.color!r}; choose one of {', '.join(COLORS)}")
        if not 1 <= self.count <= len(COUNT_WORDS):
            raise UserError(f"count must be 1..{len(COUNT_WORDS)}, got {self.count}")
        if self.tint not in TINTS:
            raise UserError(f"unknown tint {self.tint!r}; choose one of {', '.join(TINTS)}")

    def answer(self, qtype: str) -> str:
        """The true one-word answer to a question of type `qtype` about this scene."""
        if qtype == "color":
            return self.color
        if qtype == "shape":
            return self.shape
        if qtype == "count":
            return COUNT_WORDS[self.count - 1]
        raise UserError(f"unknown question type {qtype!r}; choose one of {', '.join(QUESTION_TYPES)}")

    @property
    def look(self) -> tuple[str, str, int]:
        """What the questions can tell apart: (shape, colour, count), the tint left out."""
        return self.shape, self.color, self.count

    def as_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "count": self.count, "tint": self.tint}


def all_scenes() -> list[Scene]:
    """Every attribute combination, in a fixed order (4 shapes x 6 colours x 3 counts x 12 tints
    = 864)."""
    return [Scene(s, c, n, t) for s in SHAPES for c in COLORS for n in range(1, len(COUNT_WORDS) + 1)
            for t in TINTS]


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        SHAPES[int(rng.integers(len(SHAPES)))],
        tuple(COLORS)[int(rng.integers(len(COLORS)))],
        int(rng.integers(1, len(COUNT_WORDS) + 1)),
        tuple(TINTS)[int(rng.integers(len(TINTS)))],
    )


def split_scene_pools(split_stream: int, seed: int) -> tuple[list[Scene], list[Scene]]:
    """(edit scenes, locality scenes) of one split: a seeded shuffle of `all_scenes()`, cut at
    `EDIT_FRACTION`. The locality pool holds, for every (shape, colour), scenes of every other
    shape and colour (the shuffle is redrawn until it does), so every record finds an `m_loc`."""
    scenes = all_scenes()
    n_edit = int(round(EDIT_FRACTION * len(scenes)))
    rng = np.random.default_rng([split_stream, seed, 0])
    while True:
        order = rng.permutation(len(scenes))
        edit = [scenes[int(i)] for i in sorted(order[:n_edit])]
        loc = [scenes[int(i)] for i in sorted(order[n_edit:])]
        covered = {(s.shape, s.color) for s in loc}
        if all(any(sh != a and co != b for sh, co in covered) for a in SHAPES for b in COLORS):
            return edit, loc


def max_edit_records() -> int:
    """The most edit records one split can hold with unique (scene, question type) pairs."""
    return int(round(EDIT_FRACTION * len(all_scenes()))) * len(QUESTION_TYPES)


def _place_boxes(sizes: list[float], canvas: float, rng: np.random.Generator,
                 gap: float) -> list[tuple[float, float]]:
    """Top-left corners for square boxes of `sizes` inside `canvas`, at least `gap` apart.

    Rejection sampling; shrinks nothing, so callers pass sizes that fit (they always do for
    up to 3 objects of at most 0.40 x the canvas). Deterministic for a given rng state.
    """
    margin = gap
    for _ in range(1000):
        corners: list[tuple[float, float]] = []
        for size in sizes:
            lo, hi = margin, canvas - margin - size
            for _ in range(60):
                x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
                if all(x + size + gap <= px or px + ps + gap <= x or
                       y + size + gap <= py or py + ps + gap <= y
                       for (px, py), ps in zip(corners, sizes)):
                    corners.append((x, y))
                    break
            else:
                break
        if len(corners) == len(sizes):
            return corners
    raise RuntimeError("toy world: could not place the objects without overlap")  # unreachable in practice


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, s: float,
                fill: tuple[int, int, int]) -> None:
    """One shape whose bounding box is the square (x, y, x+s, y+s)."""
    if shape == "circle":
        draw.ellipse((x, y, x + s, y + s), fill=fill)
    elif shape == "square":
        m = 0.08 * s  # a touch smaller so its area is closer to the other shapes'
        draw.rectangle((x + m, y + m, x + s - m, y + s - m), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x + s / 2, y), (x + s, y + s), (x, y + s)], fill=fill)
    elif shape == "cross":
        t = s / 3  # arm thickness
        draw.rectangle((x + t, y, x + 2 * t, y + s), fill=fill)
        draw.rectangle((x, y + t, x + s, y + 2 * t), fill=fill)
    else:
        raise UserError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def draw_scene(scene: Scene, image_size: int, rng: np.random.Generator, jitter: bool) -> Image.Image:
    """Draw `scene` as an RGB image of `image_size` x `image_size` pixels.

    Positions always come from `rng`. `jitter=False` draws objects at the nominal size with
    clean pixels; `jitter=True` (a "redraw", for image_rephrase) scales each object by a
    random factor in `_REDRAW_SCALE` and adds mild Gaussian pixel noise. Attributes stay obvious.
    """
    if image_size < _MIN_IMAGE_SIZE:
        raise UserError(f"image_size must be at least {_MIN_IMAGE_SIZE} px, got {image_size}")
    k = _SUPERSAMPLE
    canvas = image_size * k
    nominal = _SIZE_FRACTION * canvas
    if jitter:
        sizes = [nominal * float(rng.uniform(*_REDRAW_SCALE)) for _ in range(scene.count)]
    else:
        sizes = [nominal] * scene.count
    corners = _place_boxes(sizes, canvas, rng, gap=1.5 * k)
    img = Image.new("RGB", (canvas, canvas), TINTS[scene.tint])
    draw = ImageDraw.Draw(img)
    fill = COLORS[scene.color]
    for (x, y), s in zip(corners, sizes):
        _draw_shape(draw, scene.shape, x, y, s, fill)
    img = img.reduce(k)  # box filter: anti-aliased edges, exact and fast
    if jitter:
        arr = np.asarray(img, dtype=np.float32)  # [h, w, 3]
        arr = arr + rng.normal(0.0, _NOISE_STD, size=arr.shape)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img


def _background_distance(arr: np.ndarray) -> np.ndarray:
    """[n, 3] pixels -> [n] distance to the nearest tint."""
    tints = np.asarray(list(TINTS.values()), dtype=np.float32)  # [t, 3]
    return np.linalg.norm(arr[:, None, :] - tints[None], axis=2).min(axis=1)


def classify_color(image: Image.Image) -> str | None:
    """The palette colour nearest to the median non-background pixel (None if all background).

    A crude check that an image shows the colour it should; used by tests and sanity scripts.
    """
    arr = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)  # [h*w, 3]
    fg = arr[_background_distance(arr) > 60.0]
    if len(fg) == 0:
        return None
    med = np.median(fg, axis=0)
    names = list(COLORS)
    pal = np.asarray([COLORS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(pal - med, axis=1)))]


def classify_tint(image: Image.Image) -> str:
    """The tint nearest to the mean background pixel (pixels near some tint), for checks."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)  # [h*w, 3]
    bg = arr[_background_distance(arr) < 30.0]
    mean = bg.mean(axis=0) if len(bg) else arr.mean(axis=0)
    names = list(TINTS)
    pal = np.asarray([TINTS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(pal - mean, axis=1)))]


# --------------------------------------------------------------------------- prompts


def vqa_prompt(question: str) -> str:
    """The prompt a model sees for an image question (what the E-VQA reader builds)."""
    return question + VQA_SUFFIX


def text_prompt(loc: str) -> str:
    """The prompt a model sees for a text-locality question (`loc` already has the prefix)."""
    return loc + TEXT_LOC_SUFFIX


# --------------------------------------------------------------------------- text facts


@dataclass(frozen=True)
class TextFact:
    """An invented fact answerable without an image."""

    question: str  # e.g. "what is the capital of zorvia"
    answer: str  # e.g. "mippel"

    @property
    def loc(self) -> str:
        """The MMEdit `loc` field: "nq question: <question>" (the reader appends "?")."""
        return TEXT_LOC_PREFIX + self.question


_RELATIONS = (
    "what is the capital of {}",
    "what language is spoken in {}",
    "who is the ruler of {}",
    "what is the currency of {}",
)
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "l", "r", "x", "m")
_COUNTRY_ENDINGS = ("ia", "land", "stan", "or")
_RESERVED = set(COLORS) | set(SHAPES) | set(COUNT_WORDS)


def _invent_word(rng: np.random.Generator, syllables: int) -> str:
    parts = []
    for _ in range(syllables):
        parts.append(_ONSETS[int(rng.integers(len(_ONSETS)))]
                     + _VOWELS[int(rng.integers(len(_VOWELS)))]
                     + _CODAS[int(rng.integers(len(_CODAS)))])
    return "".join(parts)


def max_text_facts() -> int:
    return 64 * len(_RELATIONS)


def text_facts(seed: int = 0, n: int = 40) -> list[TextFact]:
    """A deterministic table of `n` invented facts (countries x relations), seeded by `seed`.

    Every name is unique, made of 2-3 invented syllables, and never a colour, shape or number.
    Facts are listed country by country: capital, language, ruler, currency.
    """
    if not 1 <= n <= max_text_facts():
        raise UserError(f"n_facts must be between 1 and {max_text_facts()}, got {n}")
    rng = np.random.default_rng([_STREAM_FACTS, seed])
    used: set[str] = set(_RESERVED)

    def fresh(syllables: int, ending: str = "") -> str:
        while True:
            word = _invent_word(rng, syllables) + ending
            if word not in used:
                used.add(word)
                return word

    facts: list[TextFact] = []
    while len(facts) < n:
        country = fresh(1 + int(rng.integers(2)), _COUNTRY_ENDINGS[int(rng.integers(len(_COUNTRY_ENDINGS)))])
        for rel in _RELATIONS:
            if len(facts) == n:
                break
            facts.append(TextFact(rel.format(country), fresh(2)))
    return facts


# --------------------------------------------------------------------------- generation


def _check_args(n_train: int, n_eval: int, image_size: int, seed: int, n_pretrain_scenes: int,
                n_facts: int) -> None:
    for name, val in (("n_train", n_train), ("n_eval", n_eval), ("n_pretrain_scenes", n_pretrain_scenes)):
        if not isinstance(val, int) or val < 0:
            raise UserError(f"--{name} must be a non-negative integer, got {val!r}")
    for name, val in (("n_train", n_train), ("n_eval", n_eval)):
        if val > max_edit_records():
            raise UserError(
                f"--{name} {val} is too large for the toy world: a split holds at most {max_edit_records()} "
                f"edit records with distinct (scene, question type) pairs ({len(all_scenes())} scenes, "
                f"{EDIT_FRACTION:.0%} of them editable, {len(QUESTION_TYPES)} question types)")
    if not isinstance(image_size, int) or image_size < _MIN_IMAGE_SIZE:
        raise UserError(f"--image_size must be an integer >= {_MIN_IMAGE_SIZE}, got {image_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed!r}")
    if not isinstance(n_facts, int) or not 1 <= n_facts <= max_text_facts():
        raise UserError(f"--n_facts must be an integer in 1..{max_text_facts()}, got {n_facts!r}")


def _save_png(img: Image.Image, path: Path) -> None:
    img.save(path, format="PNG", optimize=False, compress_level=6)


def _pixel_hash(img: Image.Image) -> bytes:
    return hashlib.blake2b(img.tobytes(), digest_size=16).digest()


def _write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _pick(rng: np.random.Generator, options) -> object:
    return options[int(rng.integers(len(options)))]


def _edit_sequence(edit_pool: list[Scene], n: int, rng: np.random.Generator) -> list[tuple[Scene, str]]:
    """`n` distinct (scene, question type) pairs of `edit_pool`, in a seeded random order where
    each pair differs in (shape, colour, count, question type) from the `CHUNK_WINDOW` - 1 before
    it whenever an unused pair allows it (greedy: the first such pair of a shuffled list)."""
    pairs = [(sc, qt) for sc in edit_pool for qt in QUESTION_TYPES]
    remaining = [pairs[int(j)] for j in rng.permutation(len(pairs))]
    recent: list[tuple] = []  # looks + question types of the last CHUNK_WINDOW - 1 pairs
    sequence = []
    for _ in range(n):
        k = next((k for k, (sc, qt) in enumerate(remaining) if (sc.look, qt) not in recent), 0)
        scene, qtype = remaining.pop(k)
        recent = (recent + [(scene.look, qtype)])[-(CHUNK_WINDOW - 1):]
        sequence.append((scene, qtype))
    return sequence


def _make_split(split: str, n: int, stream: int, seed: int, image_size: int, out_dir: Path,
                facts: list[TextFact], scenes_meta: dict, hashes: set) -> list[dict]:
    """Write the images of one split and return its MMEdit records.

    The (scene, question type) pairs come without replacement from the split's edit pool, in an
    order where `CHUNK_WINDOW` consecutive records differ in (shape, colour, count, question
    type) whenever an unused pair allows it; `m_loc` scenes come from the split's locality pool
    and avoid the looks and question types of the edits around them.
    """
    edit_pool, loc_pool = split_scene_pools(stream, seed)
    rng = np.random.default_rng([stream, seed])
    sequence = _edit_sequence(edit_pool, n, rng)
    loc_by_look: dict[tuple[str, str], list[Scene]] = {}
    for sc in loc_pool:
        loc_by_look.setdefault((sc.shape, sc.color), []).append(sc)
    records = []
    for i, (scene, qtype) in enumerate(sequence):
        src_i, reph_i = (int(j) for j in rng.choice(len(QUESTIONS[qtype]), size=2, replace=False))
        pred = scene.answer(qtype)
        alt = _pick(rng, [a for a in ANSWERS[qtype] if a != pred])
        # Multimodal locality: a scene of the locality pool (never edited in this split),
        # different in both shape and colour, asked a question of another type; and never a
        # look-alike of an edit of the surrounding chunk window asked that edit's question type
        # (that probe would be the edit's image rephrase in all but the background tint).
        window = {(sc.look, qt) for sc, qt in sequence[max(0, i - CHUNK_WINDOW + 1):i + CHUNK_WINDOW]}
        options = [(sc, t) for (sh, co), scs in loc_by_look.items() if sh != scene.shape and co != scene.color
                   for sc in scs for t in QUESTION_TYPES if t != qtype]
        m_scene, m_qtype = _pick(rng, [o for o in options if (o[0].look, o[1]) not in window] or options)
        m_q = _pick(rng, QUESTIONS[m_qtype])
        fact = _pick(rng, facts)

        stem = f"images/{split}_{i:06d}"
        paths = {"image": f"{stem}.png", "image_rephrase": f"{stem}_r.png", "m_loc": f"{stem}_m.png"}
        for key, sc, jitter in (("image", scene, False), ("image_rephrase", scene, True), ("m_loc", m_scene, False)):
            img = draw_scene(sc, image_size, rng, jitter=jitter)
            _save_png(img, out_dir / paths[key])
            hashes.add(_pixel_hash(img))
            scenes_meta[paths[key]] = sc.as_dict()

        records.append({
            "src": QUESTIONS[qtype][src_i],
            "pred": pred,
            "rephrase": QUESTIONS[qtype][reph_i],
            "alt": alt,
            "image": paths["image"],
            "image_rephrase": paths["image_rephrase"],
            "loc": fact.loc,
            "loc_ans": fact.answer,
            "m_loc": paths["m_loc"],
            "m_loc_q": m_q,
            "m_loc_a": m_scene.answer(m_qtype),
        })
    return records


def _make_pretrain(n_scenes: int, seed: int, image_size: int, out_dir: Path, facts: list[TextFact],
                   scenes_meta: dict, forbidden: set) -> list[dict]:
    """Pretraining items: each scene drawn twice (clean + redraw), every question type x
    paraphrase asked of both draws, then every text fact once. Scenes cycle through all
    attribute combinations (tints included, so the edit and locality pools of both splits) in
    shuffled rounds, so every scene is equally covered once `n_scenes` >= 864. No image is
    pixel-identical to a train/eval image (`forbidden` holds their hashes)."""
    rng = np.random.default_rng([_STREAM_PRETRAIN, seed])
    combos = all_scenes()
    items: list[dict] = []
    order: list[int] = []
    for i in range(n_scenes):
        if not order:
            order = [int(j) for j in rng.permutation(len(combos))]
        scene = combos[order.pop()]
        for suffix, jitter in (("", False), ("_r", True)):
            img = draw_scene(scene, image_size, rng, jitter=jitter)
            while _pixel_hash(img) in forbidden:  # never reuse an edit-set image
                img = draw_scene(scene, image_size, rng, jitter=jitter)
            path = f"images/pretrain_{i:06d}{suffix}.png"
            _save_png(img, out_dir / path)
            scenes_meta[path] = scene.as_dict()
            for qtype in QUESTION_TYPES:
                for q in QUESTIONS[qtype]:
                    items.append({"image": path, "prompt": vqa_prompt(q), "target": scene.answer(qtype)})
    for fact in facts:
        items.append({"image": None, "prompt": text_prompt(fact.loc), "target": fact.answer})
    return items


VERSIONS = (3, 4)
"""Generator versions `version=` selects: 3 (this module, the default) and 4 (`world_v4.py`)."""

_V3_DEFAULTS = {"n_train": 2000, "n_eval": 500, "n_pretrain_scenes": 1000}


def toyworld_args(n_train: int | None = None, n_eval: int | None = None, image_size: int = 32, seed: int = 0,
                  n_pretrain_scenes: int | None = None, n_facts: int = 40, version: int = TOYWORLD_VERSION) -> dict:
    """The normalised generator arguments, as stored in the manifest (validates them).

    Sizes left at None take the version's defaults (v3: 2000 / 500 / 1000; v4: 4000 / 2000 / 4000).
    Version 3's dict has no "version" key, so its manifests (and pretraining cache keys) are unchanged.
    """
    if version not in VERSIONS:
        raise UserError(f"--version must be one of {', '.join(map(str, VERSIONS))}, got {version!r}")
    if version == 4:
        from . import world_v4
        defaults = world_v4.DEFAULTS
    else:
        defaults = _V3_DEFAULTS
    n_train = defaults["n_train"] if n_train is None else n_train
    n_eval = defaults["n_eval"] if n_eval is None else n_eval
    n_pretrain_scenes = defaults["n_pretrain_scenes"] if n_pretrain_scenes is None else n_pretrain_scenes
    if version == 4:
        _check_args(0, 0, image_size, seed, n_pretrain_scenes, n_facts)
        for name, val in (("n_train", n_train), ("n_eval", n_eval)):
            if not isinstance(val, int) or val < 0:
                raise UserError(f"--{name} must be a non-negative integer, got {val!r}")
        world_v4.check_sizes(n_train, n_eval)
    else:
        _check_args(n_train, n_eval, image_size, seed, n_pretrain_scenes, n_facts)
    args = {"n_train": n_train, "n_eval": n_eval, "image_size": image_size, "seed": seed,
            "n_pretrain_scenes": n_pretrain_scenes, "n_facts": n_facts}
    if version != TOYWORLD_VERSION:
        args["version"] = version
    return args


def _version_of(args: dict) -> int:
    return args.get("version", TOYWORLD_VERSION)


def generate_toyworld(out_dir, n_train: int | None = None, n_eval: int | None = None, image_size: int = 32,
                      seed: int = 0, n_pretrain_scenes: int | None = None, n_facts: int = 40,
                      version: int = TOYWORLD_VERSION) -> dict:
    """Write a toy world into `out_dir` (must be absent or empty) and return its manifest.

    Files: images/*.png, train.json, eval.json (MMEdit records), pretrain.json
    ({image, prompt, target} items; image None for text facts), scenes.json (image path ->
    {shape, color, count}) and manifest.json, written last. Not atomic on its own; use
    `ensure_toyworld` for that.
    """
    args = toyworld_args(n_train, n_eval, image_size, seed, n_pretrain_scenes, n_facts, version)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; remove it or pick another "
                        "--out (ensure_toyworld replaces an outdated toy world by itself)")
    if version == 4:
        from . import world_v4
        return world_v4.generate_v4(out, args)
    (out / "images").mkdir(parents=True, exist_ok=True)

    facts = text_facts(seed, n_facts)
    scenes_meta: dict[str, dict] = {}
    edit_hashes: set[bytes] = set()
    train = _make_split("train", n_train, _STREAM_TRAIN, seed, image_size, out, facts, scenes_meta, edit_hashes)
    evals = _make_split("eval", n_eval, _STREAM_EVAL, seed, image_size, out, facts, scenes_meta, edit_hashes)
    pretrain = _make_pretrain(n_pretrain_scenes, seed, image_size, out, facts, scenes_meta, edit_hashes)

    _write_json(train, out / "train.json")
    _write_json(evals, out / "eval.json")
    _write_json(pretrain, out / "pretrain.json")
    _write_json(dict(sorted(scenes_meta.items())), out / "scenes.json")
    manifest = {
        "generator": GENERATOR_NAME,
        "version": TOYWORLD_VERSION,
        "args": args,
        "counts": {
            "train": len(train),
            "eval": len(evals),
            "pretrain": len(pretrain),
            "pretrain_text": len(facts),
            "images": len(scenes_meta),
            "facts": len(facts),
        },
        "world": {
            "shapes": list(SHAPES),
            "colors": list(COLORS),
            "counts": list(COUNT_WORDS),
            "tints": {k: list(v) for k, v in TINTS.items()},
            "scenes": len(all_scenes()),
            "edit_fraction": EDIT_FRACTION,
            "chunk_window": CHUNK_WINDOW,
            "questions": {k: list(v) for k, v in QUESTIONS.items()},
            "vqa_suffix": VQA_SUFFIX,
            "text_loc_suffix": TEXT_LOC_SUFFIX,
        },
        "files": ["train.json", "eval.json", "pretrain.json", "scenes.json", "images/"],
    }
    _write_json(manifest, out / "manifest.json")
    return manifest


def read_manifest(out_dir) -> dict | None:
    """The toy-world manifest in `out_dir`, or None if there is none (or it is unreadable)."""
    path = Path(out_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR_NAME:
        return None
    return manifest


def _is_current(out_dir: Path, args: dict) -> bool:
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.get("version") != _version_of(args) or manifest.get("args") != args:
        return False
    return all((out_dir / name).exists() for name in ("train.json", "eval.json", "pretrain.json", "images"))


def ensure_toyworld(out_dir, force: bool = False, **kwargs) -> Path:
    """Return `out_dir` holding a toy world made with `kwargs` (see `generate_toyworld`).

    Reuses the folder when its manifest matches (same version and arguments), unless `force`.
    Otherwise generates into a hidden temporary sibling and renames it into place, replacing an
    outdated toy world; an interrupted run never leaves a folder that looks finished. Refuses to
    replace a non-empty folder that is not a toy world.
    """
    args = toyworld_args(**kwargs)
    out = Path(out_dir)
    if not force and _is_current(out, args):
        return out
    if out.exists() and read_manifest(out) is None and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists but is not a toy world (no toy-world manifest.json); "
                        "remove it or pick another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with folder_atomic(str(out)) as tmp:
        generate_toyworld(Path(tmp), **args)
    return out


def corpus_lines(seed: int = 0, n_facts: int = 40) -> list[str]:
    """Every phrase of the world (questions with their suffixes, answers, text facts): the tiny
    tokenizer's training text, so toy-world words become one or two tokens."""
    lines = [vqa_prompt(q) for qs in QUESTIONS.values() for q in qs]
    lines += [" " + " ".join(answers) for answers in ANSWERS.values()]
    lines += [text_prompt(f.loc) + " " + f.answer for f in text_facts(seed=seed, n=n_facts)]
    return lines


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld",
        description="Generate the toy world: small PNG scenes (shape, colour, count) with edit "
                    "data in the MMEdit JSON schema (train.json, eval.json), pretraining items "
                    "(pretrain.json) and a manifest. Reuses --out when it already matches.",
    )
    parser.add_argument("--out", default="data/toyworld", help="output folder (default: data/toyworld)")
    parser.add_argument("--version", type=int, default=TOYWORLD_VERSION, choices=VERSIONS,
                        help="generator version: 3 (default) or 4 (6,912 editable scenes, 1,000-record windows "
                             "of pairwise distinct scenes; see toyworld/world_v4.py)")
    parser.add_argument("--n_train", type=int, default=None,
                        help="training edit records (default: 2000; version 4: 4000)")
    parser.add_argument("--n_eval", type=int, default=None,
                        help="evaluation edit records (default: 500; version 4: 2000)")
    parser.add_argument("--image_size", type=int, default=32, help="image side in pixels, >= 24 (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default: 0)")
    parser.add_argument("--n_pretrain_scenes", type=int, default=None,
                        help="pretraining scenes, each drawn twice and asked every question "
                             "(default: 1000; version 4: 4000)")
    parser.add_argument("--n_facts", type=int, default=40, help="invented text facts for text locality (default: 40)")
    parser.add_argument("--force", action="store_true", help="regenerate even if --out already matches")
    ns = parser.parse_args(argv)
    try:
        out = ensure_toyworld(ns.out, force=ns.force, n_train=ns.n_train, n_eval=ns.n_eval,
                              image_size=ns.image_size, seed=ns.seed,
                              n_pretrain_scenes=ns.n_pretrain_scenes, n_facts=ns.n_facts, version=ns.version)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = read_manifest(out)["counts"]
    print(f"toy world in {out}: {counts['train']} train, {counts['eval']} eval, "
          f"{counts['pretrain']} pretrain items, {counts['images']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())

