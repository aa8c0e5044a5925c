"""Toy world version 4: a scene space shaped like the real benchmarks, for 1,000-edit lifelong runs.

Selected with `version=4` (`toyworld_args`, `generate_toyworld`, `ensure_toyworld`) or
`python -m toyworld --version 4`; version 3 (`world.py`) stays the default.

Scene space. A scene is seven salient attributes (`SceneV4`):
    shape (8: six editable + two locality-only), colour (8: six editable + two locality-only),
    count (1-3), size (small / large), companion (a small dark mark: none / dot / ring / line),
    pattern (background texture: plain / horizontal stripes / vertical stripes / checks),
    frame (none / a dark border).
The EDIT space (editable shapes and colours) holds 6 x 6 x 3 x 2 x 4 x 4 x 2 = 6,912 scenes; the
LOCALITY space (the two locality-only shapes x the two locality-only colours) 768. The background
lightness and hue are NOT part of a scene: every drawing draws them anew (like a photograph's
lighting), so no faint attribute carries identity.

Distinctness guarantee. The edit space is cut into six cosets of 1,152 scenes by the check sum
`sum(attribute indices) mod 6` (`coset_of`); every attribute has at most six values, so two scenes of
one coset never differ in exactly one attribute: they differ in at least two salient attributes.
A split is a sequence of blocks of `WINDOW_V4` = 1,000 records; each block draws its scenes without
replacement from its own coset (eval: the first cosets of a seeded order, train: the following ones),
so within any evaluation window of up to 1,000 aligned records (-sen 100 / 250 / 500 / 1,000 chunks
start at multiples of their size) every two edit images differ in at least two attributes, and every
edit record of a split has a unique scene (different blocks use different cosets). Train and eval
never share a scene.

Records (MMEdit schema, like version 3):
- `image_rephrase` re-renders the same scene: new positions, object sizes x0.9-1.1, a new background
  shade and pattern phase, pixel noise (MMEdit's M-Gen look-alikes);
- `m_loc` shows a scene of the locality space, which no edit uses and which differs from every edit
  scene in shape and colour (two attributes), asked any question type;
- `loc` / `loc_ans`: the text facts of version 3;
- `lookalike.json` (a stress split, no target): the eval records with `m_loc` replaced by a probe that
  differs from the record's own edit scene in exactly ONE attribute (cycling through all seven),
  asked the edit's question type: what routing must still tell apart.
`pretrain.json` cycles through every scene of both spaces in shuffled rounds, and asks about every
attribute (`PRETRAIN_QUESTIONS`: size, companion, pattern, frame, beside colour, shape, count).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from utils.errors import UserError

from . import world as w

VERSION = 4

EDIT_SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
LOC_SHAPES = ("bar", "hourglass")
EDIT_COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
LOC_COLORS = ("cyan", "pink")
COLORS: dict[str, tuple[int, int, int]] = {**w.COLORS, "cyan": (20, 195, 215), "pink": (245, 120, 190)}
SIZES = ("small", "large")
COMPANIONS = ("none", "dot", "ring", "line")
PATTERNS = ("plain", "hstripes", "vstripes", "checks")
FRAMES = ("none", "border")

ANSWERS: dict[str, tuple[str, ...]] = {
    "color": EDIT_COLORS + LOC_COLORS,
    "shape": EDIT_SHAPES + LOC_SHAPES,
    "count": w.COUNT_WORDS,
}

PRETRAIN_QUESTIONS: dict[str, tuple[str, ...]] = {
    "size": ("how big are the shapes?", "what size are the objects?"),
    "companion": ("what small dark mark is in the picture?", "which dark mark is drawn?"),
    "pattern": ("what pattern does the background have?", "how is the background patterned?"),
    "frame": ("is there a dark border?", "does the picture have a frame?"),
}
"""Questions about the attributes no edit asks, in `pretrain.json` only: pretraining on them makes
the backbone's image features encode every attribute (routing tells scenes apart by those features)."""

PRETRAIN_ANSWERS = {
    "size": dict(zip(SIZES, SIZES)),
    "companion": dict(zip(COMPANIONS, COMPANIONS)),
    "pattern": {"plain": "plain", "hstripes": "horizontal", "vstripes": "vertical", "checks": "checkered"},
    "frame": {"none": "no", "border": "yes"},
}

WINDOW_V4 = 1000
"""Aligned records per block; a block's scenes come from one coset (pairwise >= 2 attributes apart)."""

N_COSETS = 6
DEFAULTS = {"n_train": 4000, "n_eval": 2000, "n_pretrain_scenes": 4000}

_STREAM_LOOKALIKE = 5
_SIZE = {"small": 0.2, "large": 0.28}  # object bounding box side / image side
_COMPANION_SIZE = 0.15
_DARK = (55, 55, 55)  # companion and frame colour
_FRAME_PX = 2  # border width in final pixels
_PERIOD_PX = 4  # stripe / check period in final pixels (half dark, half light)
_PATTERN_DROP = 38  # how much darker the dark half of a pattern is


@dataclass(frozen=True)
class SceneV4:
    """What a version-4 image shows; questions ask about the main objects' colour, shape, count."""

    shape: str
    color: str
    count: int
    size: str = "large"
    companion: str = "none"
    pattern: str = "plain"
    frame: str = "none"

    def __post_init__(self):
        for name, options in (("shape", EDIT_SHAPES + LOC_SHAPES), ("color", EDIT_COLORS + LOC_COLORS),
                              ("size", SIZES), ("companion", COMPANIONS), ("pattern", PATTERNS),
                              ("frame", FRAMES)):
            if getattr(self, name) not in options:
                raise UserError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(options)}")
        if not 1 <= self.count <= len(w.COUNT_WORDS):
            raise UserError(f"count must be 1..{len(w.COUNT_WORDS)}, got {self.count}")

    def answer(self, qtype: str) -> str:
        """The one-word answer to a question of type `qtype` (an edit or a `PRETRAIN_QUESTIONS` type)."""
        if qtype in PRETRAIN_ANSWERS:
            return PRETRAIN_ANSWERS[qtype][getattr(self, qtype)]
        if qtype == "color":
            return self.color
        if qtype == "shape":
            return self.shape
        if qtype == "count":
            return w.COUNT_WORDS[self.count - 1]
        raise UserError(f"unknown question type {qtype!r}; choose one of {', '.join(w.QUESTION_TYPES)}")

    def values(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


ATTRIBUTES = tuple(f.name for f in fields(SceneV4))


def attribute_distance(a: SceneV4, b: SceneV4) -> int:
    """How many of the seven attributes differ."""
    return sum(x != y for x, y in zip(a.values(), b.values()))


def _space(shapes, colors) -> list[SceneV4]:
    return [SceneV4(s, c, n, z, k, p, f) for s in shapes for c in colors for n in range(1, 4)
            for z in SIZES for k in COMPANIONS for p in PATTERNS for f in FRAMES]


def edit_space() -> list[SceneV4]:
    """Every editable scene (6,912), in a fixed order."""
    return _space(EDIT_SHAPES, EDIT_COLORS)


def loc_space() -> list[SceneV4]:
    """Every locality-only scene (768): locality-only shape AND colour."""
    return _space(LOC_SHAPES, LOC_COLORS)


def coset_of(scene: SceneV4) -> int:
    """sum of attribute indices mod 6 (edit space): equal cosets => >= 2 attributes differ."""
    idx = (EDIT_SHAPES.index(scene.shape), EDIT_COLORS.index(scene.color), scene.count - 1,
           SIZES.index(scene.size), COMPANIONS.index(scene.companion), PATTERNS.index(scene.pattern),
           FRAMES.index(scene.frame))
    return sum(idx) % N_COSETS


def blocks_needed(n: int) -> int:
    return -(-n // WINDOW_V4)


def check_sizes(n_train: int, n_eval: int) -> None:
    """UserError when the two splits need more blocks (cosets) than there are."""
    if blocks_needed(n_train) + blocks_needed(n_eval) > N_COSETS:
        raise UserError(
            f"--n_train {n_train} and --n_eval {n_eval} are too large for toy world version 4: each split "
            f"is cut into blocks of {WINDOW_V4} records, each block uses one of {N_COSETS} scene cosets, and "
            f"the two splits need {blocks_needed(n_train)} + {blocks_needed(n_eval)} blocks")


# --------------------------------------------------------------------------- drawing


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, s: float, fill) -> None:
    """One shape (main object or companion) in the square box (x, y, x+s, y+s)."""
    if shape in ("circle", "square", "triangle", "cross"):
        w._draw_shape(draw, shape, x, y, s, fill)
    elif shape == "diamond":
        draw.polygon([(x + s / 2, y), (x + s, y + s / 2), (x + s / 2, y + s), (x, y + s / 2)], fill=fill)
    elif shape == "ring":
        draw.ellipse((x, y, x + s, y + s), outline=fill, width=max(1, int(round(0.22 * s))))
    elif shape == "bar":
        draw.rectangle((x, y + 0.3 * s, x + s, y + 0.7 * s), fill=fill)
    elif shape == "hourglass":
        draw.polygon([(x, y), (x + s, y), (x + s / 2, y + s / 2)], fill=fill)
        draw.polygon([(x + s / 2, y + s / 2), (x + s, y + s), (x, y + s)], fill=fill)
    elif shape == "dot":
        m = 0.2 * s
        draw.ellipse((x + m, y + m, x + s - m, y + s - m), fill=fill)
    else:
        raise UserError(f"unknown shape {shape!r}")


def _background(scene: SceneV4, canvas: int, k: int, rng: np.random.Generator) -> Image.Image:
    """A light, barely coloured background (a fresh shade every drawing) with the scene's pattern."""
    light = float(rng.uniform(200, 236))
    base = np.clip(light + rng.uniform(-9, 9, size=3), 0, 255)  # [3]
    arr = np.empty((canvas, canvas, 3), dtype=np.float32)
    arr[:] = base
    period = _PERIOD_PX * k
    phase = int(rng.integers(period))
    ys, xs = np.mgrid[0:canvas, 0:canvas]  # [c, c] each
    if scene.pattern == "hstripes":
        dark = ((ys + phase) % period) < period // 2
    elif scene.pattern == "vstripes":
        dark = ((xs + phase) % period) < period // 2
    elif scene.pattern == "checks":
        dark = ((((ys + phase) // (period // 2)) + ((xs + phase) // (period // 2))) % 2) == 1
    else:
        dark = np.zeros((canvas, canvas), dtype=bool)
    arr[dark] -= _PATTERN_DROP
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def draw_scene_v4(scene: SceneV4, image_size: int, rng: np.random.Generator, jitter: bool) -> Image.Image:
    """Draw `scene` as an RGB `image_size` square. Positions and background shade always come from
    `rng`; `jitter=True` (an image rephrase) also scales each object by 0.9-1.1 and adds pixel noise."""
    if image_size < w._MIN_IMAGE_SIZE:
        raise UserError(f"image_size must be at least {w._MIN_IMAGE_SIZE} px, got {image_size}")
    k = w._SUPERSAMPLE
    canvas = image_size * k
    nominal = _SIZE[scene.size] * canvas
    sizes = [nominal * (float(rng.uniform(*w._REDRAW_SCALE)) if jitter else 1.0) for _ in range(scene.count)]
    has_companion = scene.companion != "none"
    if has_companion:
        sizes.append(_COMPANION_SIZE * canvas)
    inset = _FRAME_PX * k if scene.frame == "border" else 0
    corners = w._place_boxes(sizes, canvas - 2 * inset, rng, gap=1.5 * k)
    img = _background(scene, canvas, k, rng)
    draw = ImageDraw.Draw(img)
    if scene.frame == "border":
        draw.rectangle((0, 0, canvas - 1, canvas - 1), outline=_DARK, width=_FRAME_PX * k)
    for i, ((x, y), s) in enumerate(zip(corners, sizes)):
        x, y = x + inset, y + inset
        if has_companion and i == len(sizes) - 1:
            _draw_object(draw, {"dot": "dot", "ring": "ring", "line": "bar"}[scene.companion], x, y, s, _DARK)
        else:
            _draw_object(draw, scene.shape, x, y, s, COLORS[scene.color])
    img = img.reduce(k)
    if jitter:
        arr = np.asarray(img, dtype=np.float32)  # [h, w, 3]
        arr = arr + rng.normal(0.0, w._NOISE_STD, size=arr.shape)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img


# --------------------------------------------------------------------------- splits


def coset_order(seed: int) -> list[int]:
    """The seeded order in which blocks take cosets: eval's blocks first, then train's."""
    rng = np.random.default_rng([w._STREAM_EVAL, seed, 7])
    return [int(c) for c in rng.permutation(N_COSETS)]


def split_scenes(n: int, cosets: list[int], stream: int, seed: int) -> list[SceneV4]:
    """`n` scenes: block b (records b*WINDOW_V4 ...) draws without replacement from coset cosets[b]."""
    by_coset: dict[int, list[SceneV4]] = {}
    for sc in edit_space():
        by_coset.setdefault(coset_of(sc), []).append(sc)
    rng = np.random.default_rng([stream, seed, 1])
    out: list[SceneV4] = []
    for b in range(blocks_needed(n)):
        pool = by_coset[cosets[b]]
        take = min(WINDOW_V4, n - b * WINDOW_V4)
        out += [pool[int(j)] for j in rng.permutation(len(pool))[:take]]
    return out


def one_attribute_change(scene: SceneV4, attribute: str, rng: np.random.Generator) -> SceneV4:
    """`scene` with `attribute` set to another editable value (a look-alike)."""
    options = {"shape": EDIT_SHAPES, "color": EDIT_COLORS, "count": (1, 2, 3), "size": SIZES,
               "companion": COMPANIONS, "pattern": PATTERNS, "frame": FRAMES}[attribute]
    value = w._pick(rng, [v for v in options if v != getattr(scene, attribute)])
    return SceneV4(**{**scene.as_dict(), attribute: value})


def _make_split(split: str, scenes: list[SceneV4], stream: int, seed: int, image_size: int, out_dir: Path,
                facts: list, scenes_meta: dict, hashes: set) -> list[dict]:
    """Write one split's images and return its MMEdit records (one per scene, in order)."""
    rng = np.random.default_rng([stream, seed])
    loc_pool = loc_space()
    qtypes = [w.QUESTION_TYPES[int(j) % 3] for j in rng.permutation(len(scenes))]  # balanced types
    records = []
    for i, (scene, qtype) in enumerate(zip(scenes, qtypes)):
        src_i, reph_i = (int(j) for j in rng.choice(len(w.QUESTIONS[qtype]), size=2, replace=False))
        pred = scene.answer(qtype)
        editable = {"color": EDIT_COLORS, "shape": EDIT_SHAPES, "count": w.COUNT_WORDS}[qtype]
        alt = w._pick(rng, [a for a in editable if a != pred])
        m_scene = w._pick(rng, loc_pool)
        m_qtype = w._pick(rng, w.QUESTION_TYPES)
        m_q = w._pick(rng, w.QUESTIONS[m_qtype])
        fact = w._pick(rng, facts)
        stem = f"images/{split}_{i:06d}"
        paths = {"image": f"{stem}.png", "image_rephrase": f"{stem}_r.png", "m_loc": f"{stem}_m.png"}
        for key, sc, jitter in (("image", scene, False), ("image_rephrase", scene, True), ("m_loc", m_scene, False)):
            img = draw_scene_v4(sc, image_size, rng, jitter=jitter)
            w._save_png(img, out_dir / paths[key])
            hashes.add(w._pixel_hash(img))
            scenes_meta[paths[key]] = sc.as_dict()
        records.append({
            "src": w.QUESTIONS[qtype][src_i], "pred": pred, "rephrase": w.QUESTIONS[qtype][reph_i], "alt": alt,
            "image": paths["image"], "image_rephrase": paths["image_rephrase"],
            "loc": fact.loc, "loc_ans": fact.answer,
            "m_loc": paths["m_loc"], "m_loc_q": m_q, "m_loc_a": m_scene.answer(m_qtype),
        })
    return records


def _make_lookalike(evals: list[dict], scenes: list[SceneV4], seed: int, image_size: int, out_dir: Path,
                    scenes_meta: dict, hashes: set) -> tuple[list[dict], dict[str, int]]:
    """The stress split: each eval record with an `m_loc` probe one attribute away from its edit scene,
    asked the edit's question type (cycling through the attributes). Returns (records, changes)."""
    rng = np.random.default_rng([_STREAM_LOOKALIKE, seed])
    qtype_of = {q: t for t, qs in w.QUESTIONS.items() for q in qs}
    changed: dict[str, int] = {a: 0 for a in ATTRIBUTES}
    records = []
    for i, (rec, scene) in enumerate(zip(evals, scenes)):
        attribute = ATTRIBUTES[i % len(ATTRIBUTES)]
        probe = one_attribute_change(scene, attribute, rng)
        changed[attribute] += 1
        qtype = qtype_of[rec["src"]]
        path = f"images/lookalike_{i:06d}.png"
        img = draw_scene_v4(probe, image_size, rng, jitter=False)
        w._save_png(img, out_dir / path)
        hashes.add(w._pixel_hash(img))
        scenes_meta[path] = probe.as_dict()
        records.append({**rec, "m_loc": path, "m_loc_q": w._pick(rng, w.QUESTIONS[qtype]),
                        "m_loc_a": probe.answer(qtype)})
    return records, changed


def _make_pretrain(n_scenes: int, seed: int, image_size: int, out_dir: Path, facts: list, scenes_meta: dict,
                   forbidden: set) -> list[dict]:
    """Each scene drawn twice (clean + redraw), every question x paraphrase asked of both; scenes cycle
    through both spaces (7,680) in shuffled rounds, and are also asked the `PRETRAIN_QUESTIONS` about
    size, companion, pattern and frame; then the text facts. No edit image reused."""
    rng = np.random.default_rng([w._STREAM_PRETRAIN, seed, VERSION])
    combos = edit_space() + loc_space()
    items: list[dict] = []
    order: list[int] = []
    for i in range(n_scenes):
        if not order:
            order = [int(j) for j in rng.permutation(len(combos))]
        scene = combos[order.pop()]
        for suffix, jitter in (("", False), ("_r", True)):
            img = draw_scene_v4(scene, image_size, rng, jitter=jitter)
            while w._pixel_hash(img) in forbidden:
                img = draw_scene_v4(scene, image_size, rng, jitter=jitter)
            path = f"images/pretrain_{i:06d}{suffix}.png"
            w._save_png(img, out_dir / path)
            scenes_meta[path] = scene.as_dict()
            for qtype, questions in {**w.QUESTIONS, **PRETRAIN_QUESTIONS}.items():
                for q in questions:
                    items.append({"image": path, "prompt": w.vqa_prompt(q), "target": scene.answer(qtype)})
    for fact in facts:
        items.append({"image": None, "prompt": w.text_prompt(fact.loc), "target": fact.answer})
    return items


def pretrain_question_types() -> dict[str, str]:
    """Prompt (with the VQA suffix) -> question type, for every image question of `pretrain.json`."""
    return {w.vqa_prompt(q): t for t, qs in {**w.QUESTIONS, **PRETRAIN_QUESTIONS}.items() for q in qs}


def generate_v4(out: Path, args: dict) -> dict:
    """Write a version-4 toy world into the (empty, existing) folder `out`; returns the manifest."""
    seed, size = args["seed"], args["image_size"]
    (out / "images").mkdir(parents=True, exist_ok=True)
    facts = w.text_facts(seed, args["n_facts"])
    order = coset_order(seed)
    eval_cosets = order[:blocks_needed(args["n_eval"])]
    train_cosets = order[len(eval_cosets):]
    eval_scenes = split_scenes(args["n_eval"], eval_cosets, w._STREAM_EVAL, seed)
    train_scenes = split_scenes(args["n_train"], train_cosets, w._STREAM_TRAIN, seed)
    scenes_meta: dict[str, dict] = {}
    hashes: set[bytes] = set()
    train = _make_split("train", train_scenes, w._STREAM_TRAIN, seed, size, out, facts, scenes_meta, hashes)
    evals = _make_split("eval", eval_scenes, w._STREAM_EVAL, seed, size, out, facts, scenes_meta, hashes)
    lookalike, changed = _make_lookalike(evals, eval_scenes, seed, size, out, scenes_meta, hashes)
    pretrain = _make_pretrain(args["n_pretrain_scenes"], seed, size, out, facts, scenes_meta, hashes)
    w._write_json(train, out / "train.json")
    w._write_json(evals, out / "eval.json")
    w._write_json(lookalike, out / "lookalike.json")
    w._write_json(pretrain, out / "pretrain.json")
    w._write_json(dict(sorted(scenes_meta.items())), out / "scenes.json")
    manifest = {
        "generator": w.GENERATOR_NAME,
        "version": VERSION,
        "args": args,
        "counts": {"train": len(train), "eval": len(evals), "lookalike": len(lookalike),
                   "pretrain": len(pretrain), "pretrain_text": len(facts), "images": len(scenes_meta),
                   "facts": len(facts)},
        "world": {
            "edit_shapes": list(EDIT_SHAPES), "loc_shapes": list(LOC_SHAPES),
            "edit_colors": list(EDIT_COLORS), "loc_colors": list(LOC_COLORS),
            "counts": list(w.COUNT_WORDS), "sizes": list(SIZES), "companions": list(COMPANIONS),
            "patterns": list(PATTERNS), "frames": list(FRAMES),
            "edit_scenes": len(edit_space()), "loc_scenes": len(loc_space()),
            "window": WINDOW_V4, "cosets": N_COSETS, "eval_cosets": eval_cosets,
            "train_cosets": train_cosets[:blocks_needed(args["n_train"])],
            "lookalike_changed": changed,
            "questions": {k: list(v) for k, v in w.QUESTIONS.items()},
            "pretrain_questions": {k: list(v) for k, v in PRETRAIN_QUESTIONS.items()},
            "vqa_suffix": w.VQA_SUFFIX, "text_loc_suffix": w.TEXT_LOC_SUFFIX,
        },
        "files": ["train.json", "eval.json", "lookalike.json", "pretrain.json", "scenes.json", "images/"],
    }
    w._write_json(manifest, out / "manifest.json")
    return manifest
