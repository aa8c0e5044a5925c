"""Teach a tiny backbone the toy world, so that edits have knowledge to change (DESIGN.md §5).

All weights of the tiny model (vision encoder, bridge, LM) are trained on `pretrain.json` (every
question type x paraphrase on pictures of every scene, plus the text facts). The result is checked
on the held-out eval split — the image-locality and text-locality questions and the edit records'
original answers (`pred`) — and cached under `records/pretrained/<name>-<key>/` so later runs
reuse it. Same seed, same model. `python -m runs.pretrain` trains all three and prints
the time and accuracies.

What makes the vision side learn in a few CPU minutes (measured on the default toy world, one
core: ~2.5-3.5 min per backbone, every `toy_accuracy` key >= 0.98 but `alt` ~0):
- a working initialisation: `TinySpec.vision_init_std` (Blip2VisionConfig's default 1e-10 left the
  BLIP-2 / MiniGPT-4 vision encoders dead) and random, not zero, BLIP-2 query tokens (`tiny.py`);
- two phases. Phase 1 trains only the vision encoder and the bridge, through linear answer heads
  (one per question type) on the mean image feature of the bridge output and of the vision
  encoder's patches (`_AuxHeads`); it is cheap (no LM) so it sees many pictures. Without it the
  gradient that reaches the pixels through the LM is too weak: shape and count stayed at chance.
  Phase 2 trains everything with teacher forcing on the questions and the text facts, the
  auxiliary loss fading out;
- each phase-2 step asks every picture one question of each type (a random paraphrase), and
  features are computed once per picture and shared by its rows;
- per-group learning rates (LM / vision encoder / bridge), linear warm-up, cosine decay; the LM's
  schedule starts with phase 2;
- dropout is off (the modules run in eval mode while their gradients are on): the tiny models
  underfit rather than overfit;
- pixels of all pretraining images are preprocessed once, and the tokenisation of the few
  distinct (prompt, target) strings is memoised; both go through the backbone's own `prepare`.
  Per family (`_bank`): fixed-size backbones keep an [n, 3, H, W] pixel tensor (`_PixelBank`);
  processor-driven ones (`HFVLM`, e.g. tiny-qwen2.5-vl) keep each picture's patch sequence and grid,
  whose image-token count may vary, and memoise a row's ids and M-RoPE positions per (prompt,
  target, grid) (`_PatchBank`). `python -m runs.pretrain --names tiny-qwen2.5-vl` pretrains it with
  the same defaults (docs/DEMO.md, "Other backbones").
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from editors.vllms import save_vllm
from editors.vllms.hf_vlm import HFVLM
from editors.vllms.tiny import TINY_NAMES, TinySpec, build_tiny
from editors.vllms.tiny_vlm import TINY_VLM_NAMES, build_tiny_vlm
from toyworld import keep_toyworld
from toyworld.world import QUESTIONS, read_manifest, vqa_prompt
from toyworld.world_v4 import pretrain_question_types
from utils.data import load_edit_dataset
from utils.devices import tune_cpu_threads
from utils.errors import UserError
from utils.images import ImageCache, load_image
from utils.io import folder_atomic, write_json_atomic
from utils.records import Sample


def _default_spec() -> TinySpec:
    return TinySpec(hidden_size=128, vision_hidden_size=96, vision_layers=3, vision_init_std=0.05)


@dataclass
class PretrainConfig:
    """How a tiny backbone learns the toy world: two phases, ~2-4 minutes on one CPU core.

    Phase 1 (`vision_steps`): vision encoder + bridge only, taught by linear answer heads on the
    mean image feature (bridge output, and with `aux_vision` also the vision encoder's patches),
    `vision_batch` pictures a step. Phase 2 (`steps`): every weight, on the questions and the text
    facts (teacher forcing), the auxiliary loss fading out over `aux_steps` of it.
    """

    spec: TinySpec = field(default_factory=_default_spec)
    vision_steps: int = 1000     # phase 1 steps
    vision_batch: int = 32       # pictures per phase-1 step
    steps: int = 400             # phase 2 steps
    batch_images: int = 16       # distinct pictures per phase-2 step; each is asked one question per type
    text_rows: int = 12          # text-fact rows per phase-2 step
    lr: float = 2e-3             # AdamW peak learning rate of the LM (phase 2 only)
    vision_lr: float = 2e-3      # ... of the vision encoder (both phases)
    bridge_lr: float | None = None  # ... of the bridge (Q-Former, query tokens, projector); None: vision_lr
    warmup: int = 60             # linear warm-up steps (at the start of each group's training)
    min_lr_ratio: float = 0.05   # cosine decay ends at this share of the peak
    weight_decay: float = 0.01
    aux_weight: float = 1.0      # weight of the auxiliary answer heads (0: none, and no phase 1)
    aux_steps: float = 1.0       # share of phase 2 over which that weight decays linearly to 0
    aux_vision: bool = True      # heads on the vision encoder's mean patch feature too
    seed: int = 0                # data order and auxiliary heads (the weights' seed is spec.seed)


PRETRAIN_OVERRIDES: dict[str, dict] = {}
"""Per-backbone changes to the `PretrainConfig` defaults (`config_for`, used by `ensure_pretrained`);
`spec` entries are dicts of `TinySpec` fields. Empty: the defaults suit all three backbones."""

_V4_WIDER = {"spec": {"vision_hidden_size": 128, "vision_layers": 4}, "vision_steps": 6000}  # 8-px patches kept
_V4_TOWER = {**_V4_WIDER, "spec": {**_V4_WIDER["spec"], "patch_size": 4}}
WORLD_OVERRIDES: dict[int, dict[str, dict]] = {
    4: {"tiny-blip2": {**_V4_TOWER, "vision_steps": 24000}, "tiny-minigpt4": _V4_TOWER, "tiny-llava": _V4_WIDER},
}
"""Per toy-world version, per-backbone changes on top of `PRETRAIN_OVERRIDES`. Version 4's scenes
hold small shapes and marks that 8-pixel patches of a 96-wide, 3-layer tower do not resolve; with
4-pixel patches, width 128, 4 layers and 3,000 phase-1 steps tiny-blip2 tells an image rephrase's
scene from the others 3x as often and LiveEdit's reliability at 1,000 edits rises from 0.83 to 0.96
(docs/LIFELONG.md, section 4); 6,000 phase-1 steps then lift shape / count recognition (0.56 / 0.83 ->
0.72 / 0.91) and M-Gen at 1,000 edits from 0.78 to 0.84 (section 6); 12,000 phase-1 steps lift shape
recognition to 0.89 and the three-seed M-Gen at 1,000 edits from 0.81 to 0.88, 24,000 steps lift them to
0.95 and 0.92 with fewer experts selected per query (5.0 at 1,000 edits against 7.4; section 11). The same
tower at 6,000 phase-1 steps lifts tiny-minigpt4's reliability at 1,000 edits from 0.73 to 0.95
(section 8). tiny-llava feeds one LM token per patch, so it keeps 8-px patches (16 image tokens; 4-px
patches quadruple them, and LiveEdit's training on that did not converge: reliability 0.42 at one edit,
section 9) with the wider, deeper tower and the 6,000 phase-1 steps: its toy accuracy `pred` rises from
0.78 to 0.96 and LiveEdit's reliability at 1,000 edits from 0.83 to 0.97 (section 10).
The version-3 world (the demo's) keeps the defaults."""


def config_for(name: str, world_version: int | None = None, **changes) -> PretrainConfig:
    """The config of backbone `name` for a toy world of `world_version` (None: any, the defaults):
    the defaults, then `PRETRAIN_OVERRIDES[name]`, then `WORLD_OVERRIDES[world_version][name]`, then
    `changes` (a `spec` given as a dict changes only those `TinySpec` fields)."""
    cfg = PretrainConfig()
    for layer in (PRETRAIN_OVERRIDES.get(name, {}), WORLD_OVERRIDES.get(world_version, {}).get(name, {}), changes):
        layer = dict(layer)
        spec = layer.pop("spec", None)
        if isinstance(spec, dict):
            layer["spec"] = dataclasses.replace(cfg.spec, **spec)
        elif spec is not None:
            layer["spec"] = spec
        cfg = dataclasses.replace(cfg, **layer)
    return cfg


def config_for_world(name: str, world_dir: str, **changes) -> PretrainConfig:
    """`config_for` with the version of the toy world in `world_dir` (no manifest: the defaults)."""
    return config_for(name, (read_manifest(world_dir) or {}).get("version"), **changes)


def recipe_key(cfg: PretrainConfig) -> str:
    """A short hash of the whole config: what `run_tables.py` puts in a pretraining job's command, so
    that a changed recipe reruns that job and everything trained or evaluated on its backbone."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]


def cache_key(name: str, world_manifest: dict, cfg: PretrainConfig) -> str:
    blob = json.dumps({"name": name, "world": world_manifest.get("args"),
                       "world_version": world_manifest.get("version"), "cfg": dataclasses.asdict(cfg)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- data


@dataclass
class _World:
    """`pretrain.json` grouped for sampling: per image, its questions by type; the text facts."""

    images: list[str]                              # image paths (world_dir joined)
    questions: list[dict[str, list[tuple[str, str]]]]  # per image: qtype -> [(prompt, target)]
    text: list[tuple[str, str]]                    # (prompt, target) of the text facts


def _load_world(world_dir: str) -> _World:
    qtype_of = {vqa_prompt(q): t for t, qs in QUESTIONS.items() for q in qs}
    qtype_of.update(pretrain_question_types())  # toy world v4 also asks about size, pattern, ...
    with open(os.path.join(world_dir, "pretrain.json")) as f:
        items = json.load(f)
    index: dict[str, int] = {}
    images: list[str] = []
    questions: list[dict[str, list[tuple[str, str]]]] = []
    text: list[tuple[str, str]] = []
    for it in items:
        if not it["image"]:
            text.append((it["prompt"], it["target"]))
            continue
        if it["image"] not in index:
            index[it["image"]] = len(images)
            images.append(os.path.join(world_dir, it["image"]))
            questions.append({})
        qtype = qtype_of.get(it["prompt"], "other")
        questions[index[it["image"]]].setdefault(qtype, []).append((it["prompt"], it["target"]))
    if not images or not text:
        raise ValueError(f"{world_dir}/pretrain.json needs image items and text facts")
    return _World(images, questions, text)


def _pixel_bank(vllm, paths: list[str], chunk: int = 256) -> torch.Tensor:
    """[n, 3, H, W] preprocessed pixels of every image, in order (the backbone's own processor)."""
    parts = [vllm.pixel_values([load_image(p) for p in paths[i:i + chunk]]) for i in range(0, len(paths), chunk)]
    return torch.cat(parts)


class _PixelBank:
    """Every pretraining picture of a fixed-size backbone (BLIP-2, LLaVA, MiniGPT-4), preprocessed
    once: [n, 3, H, W] pixels; each picture becomes the same number of image tokens."""

    def __init__(self, vllm, paths: list[str]):
        self.vllm, self.pixels = vllm, _pixel_bank(vllm, paths)

    def encode(self, indices: torch.Tensor) -> torch.Tensor:
        """[n, tokens, d] bridge output of the pictures `indices`."""
        return self.vllm.encode_images(self.pixels[indices].to(self.vllm.device, self.vllm.dtype))

    def inputs(self, tokenize: Callable, seen: dict):
        """The fast-input block of this bank (`_fast_inputs`)."""
        return _fast_inputs(self.vllm, self.pixels, tokenize, seen)


class _PatchBank:
    """Every pretraining picture of a processor-driven backbone (`HFVLM`: Qwen2.5-VL, ...), run
    through its image processor once: per picture its patch sequence [p_i, c] and its grid [3]
    (t, h, w patches); a picture becomes t*h*w / merge^2 image tokens, a number that may vary."""

    def __init__(self, vllm: HFVLM, paths: list[str], chunk: int = 256):
        self.vllm, self.paths = vllm, paths
        self.pixels: list[torch.Tensor] = []  # per picture [p_i, c]
        self.grids: list[torch.Tensor] = []   # per picture [3]
        for i in range(0, len(paths), chunk):
            out = vllm.processor.image_processor(images=[load_image(p) for p in paths[i:i + chunk]],
                                                 return_tensors="pt")
            grids = out["image_grid_thw"]  # [k, 3]
            self.grids.extend(grids.unbind(0))
            self.pixels.extend(out["pixel_values"].split(grids.prod(-1).tolist()))

    def image_inputs(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The processor outputs of the pictures `indices`, joined as the processor joins them."""
        return {"pixel_values": torch.cat([self.pixels[i] for i in indices]),
                "image_grid_thw": torch.stack([self.grids[i] for i in indices])}

    def encode(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Per picture of `indices` its [n_i, d] image features (what the LM sees)."""
        return self.vllm.encode_images(self.image_inputs(indices.tolist()))[0]

    def inputs(self, tokenize: Callable, seen: dict):
        """The fast-input block of this bank (`_fast_patch_inputs`; `tokenize` is not needed: the
        processor's rows are memoised there)."""
        return _fast_patch_inputs(self.vllm, self, seen)


def _bank(vllm, paths: list[str]) -> _PixelBank | _PatchBank:
    """The pretraining pictures preprocessed the way this backbone's family needs."""
    return _PatchBank(vllm, paths) if isinstance(vllm, HFVLM) else _PixelBank(vllm, paths)


@contextlib.contextmanager
def _fast_inputs(vllm, bank: torch.Tensor, tokenize: Callable, seen: dict | None = None):
    """Within this block `vllm.prepare` takes bank indices as images, encodes each distinct picture
    once, and tokenises with `tokenize` (a memoised `vllm._tokenize`). `seen` receives the bank
    indices ("indices") and image features ("features") of the distinct pictures."""
    encode = vllm.encode_images

    def pixel_values(indices):
        return torch.as_tensor(list(indices), dtype=torch.long)

    def encode_images(indices: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(indices, return_inverse=True)
        features = encode(bank[unique].to(vllm.device, vllm.dtype))
        if seen is not None:
            seen.update(indices=unique, features=features)
        return features[inverse]

    vllm.pixel_values, vllm.encode_images = pixel_values, encode_images
    vllm._tokenize = tokenize
    try:
        yield
    finally:
        for attr in ("pixel_values", "encode_images", "_tokenize"):
            vars(vllm).pop(attr, None)


_PATCHED_HF = ("_row", "_features", "_positions")


@contextlib.contextmanager
def _fast_patch_inputs(vllm: HFVLM, bank: _PatchBank, seen: dict | None = None):
    """`_fast_inputs` for a processor-driven backbone: within this block `vllm.prepare` takes bank
    indices as images; a row's ids and positions are computed once per (prompt, target, picture
    grid) (the processor's text depends on the picture only through its grid), its pixels come
    from the bank, and each distinct picture of a batch is encoded once. `seen` receives the bank
    indices ("indices") and per picture [n_i, d] features ("features") of the distinct pictures."""
    row, positions = vllm._row, vllm._positions
    rows: dict[tuple, tuple[torch.Tensor, int]] = {}
    placed: dict[tuple, torch.Tensor] = {}

    def fast_row(prompt: str, target: str, index: int | None):
        key = (prompt, target, None if index is None else tuple(bank.grids[index].tolist()))
        if key not in rows:
            ids, t_start, _ = row(prompt, target, None if index is None else load_image(bank.paths[index]))
            rows[key] = (ids, t_start)
        extra = {"row_key": key}
        if index is not None:
            extra.update(bank_index=index, image_grid_thw=bank.grids[index][None])
        return (*rows[key], extra)

    def fast_positions(ids: torch.Tensor, extra: dict) -> torch.Tensor:
        key = extra["row_key"]
        if key not in placed:
            placed[key] = positions(ids, extra)
        return placed[key]

    def fast_features(extras: list[dict]):
        if not extras:
            return [], None
        unique, inverse = torch.unique(torch.tensor([e["bank_index"] for e in extras]), return_inverse=True)
        features, deep = vllm.encode_images(bank.image_inputs(unique.tolist()))
        if seen is not None:
            seen.update(indices=unique, features=features)
        pick = inverse.tolist()
        return [features[j] for j in pick], None if deep is None else [deep[j] for j in pick]

    vllm._row, vllm._features, vllm._positions = fast_row, fast_features, fast_positions
    try:
        yield
    finally:
        for attr in _PATCHED_HF:
            vars(vllm).pop(attr, None)


def _target_loss(vllm, batch) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (LM head only where a target token is predicted)."""
    hidden = vllm.last_hidden(batch)  # [b, l, d]
    logits = vllm.stack.lm_head(hidden[batch.label_mask])  # [n, V]
    return F.cross_entropy(logits.float(), batch.labels[batch.label_mask])


_VISION_PREFIXES = ("vision_model.", "model.vision_tower.", "visual_encoder.", "model.visual.")
_LM_PREFIXES = ("language_model.", "model.language_model.", "lm_head.", "llama_model.")
_BRIDGE_PREFIXES = ("model.visual.merger.",)  # Qwen's patch merger sits inside its vision module


def param_groups(vllm) -> dict[str, list[torch.nn.Parameter]]:
    """The backbone's parameters as {"vision", "bridge", "lm"} (bridge: Q-Former, query tokens,
    projector — whatever is neither vision encoder nor LM)."""
    groups: dict[str, list[torch.nn.Parameter]] = {"vision": [], "bridge": [], "lm": []}
    for name, p in vllm.model.named_parameters():
        if name.startswith(_BRIDGE_PREFIXES):
            groups["bridge"].append(p)
        elif name.startswith(_VISION_PREFIXES):
            groups["vision"].append(p)
        elif name.startswith(_LM_PREFIXES):
            groups["lm"].append(p)
        else:
            groups["bridge"].append(p)
    return groups


def _vision_encoder(vllm) -> torch.nn.Module:
    """The backbone's vision encoder module (its output has `last_hidden_state`, and for LLaVA the
    `hidden_states` whose `vision_feature_layer` the projector reads; Qwen's `visual` also holds the
    merger, its `last_hidden_state` is the patches before it)."""
    model = vllm.model
    for attr in ("vision_model", "visual_encoder"):
        if hasattr(model, attr):
            return getattr(model, attr)
    return model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower


class _AuxHeads(torch.nn.Module):
    """Linear heads that read each answer (one head per question type) off the mean image feature:
    of the bridge output (what the LM sees) and, with `on_vision`, of the vision encoder's patch
    features (a forward hook keeps them). A training aid only: they make the vision side learn long
    before the LM has learned to look at it, and are thrown away afterwards.

    Fixed-size backbones give features as one [n, tokens, d] tensor and patches as [n, 1 + p, dv]
    (CLS first); processor-driven ones (`HFVLM`) give a list of [n_i, d] and all pictures' patches
    as one [sum p_i, dv] sequence, cut per picture by the grids the encoder was called with."""

    def __init__(self, vllm, world: _World, on_vision: bool):
        super().__init__()
        qtypes = sorted({t for qs in world.questions for t in qs})
        answers = {t: sorted({target for qs in world.questions for _, target in qs.get(t, [])}) for t in qtypes}
        self.register_buffer("labels", torch.tensor(  # [n_images, n_types] answer indices
            [[answers[t].index(qs[t][0][1]) for t in qtypes] for qs in world.questions]), persistent=False)
        encoder = _vision_encoder(vllm)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            self.bridge = torch.nn.ModuleList(torch.nn.Linear(vllm.hidden_size, len(answers[t])) for t in qtypes)
            self.vision = torch.nn.ModuleList(torch.nn.Linear(encoder.config.hidden_size, len(answers[t]))
                                              for t in qtypes) if on_vision else None
        self._patches: torch.Tensor | None = None  # [n, 1 + p, dv], or for HFVLM [n, dv] already pooled
        self._hook = None
        if on_vision and isinstance(vllm, HFVLM):
            def keep_pooled(module, args, kwargs, out):
                sizes = kwargs["grid_thw"].prod(-1).tolist()  # patches per picture
                self._patches = torch.stack([p.float().mean(0) for p in out.last_hidden_state.split(sizes)])

            self._hook = encoder.register_forward_hook(keep_pooled, with_kwargs=True)
        elif on_vision:
            # LLaVA's projector reads an inner layer; BLIP-2's and MiniGPT-4's bridges the last one.
            layer = getattr(getattr(vllm.model, "config", None), "vision_feature_layer", None)

            def keep(module, inputs, out):
                self._patches = out.hidden_states[layer] if layer is not None else out.last_hidden_state

            self._hook = encoder.register_forward_hook(keep)
        self.to(vllm.device)

    def loss(self, features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the heads for the pictures `indices` whose bridge output is
        `features` [n, tokens, d] or a list of n [n_i, d] (the vision encoder's output comes from the hook)."""
        labels = self.labels[indices]  # [n, n_types]
        if isinstance(features, torch.Tensor):
            pooled = features.float().mean(1)  # [n, d]
        else:
            pooled = torch.stack([f.float().mean(0) for f in features])  # [n, d]
        loss = sum(F.cross_entropy(head(pooled), labels[:, k]) for k, head in enumerate(self.bridge))
        if self.vision is not None:
            patches = self._patches  # [n, dv] pooled by the hook (HFVLM)
            if patches.ndim == 3:
                patches = patches[:, 1:].float().mean(1)  # [n, dv], CLS dropped
            loss = loss + sum(F.cross_entropy(head(patches), labels[:, k]) for k, head in enumerate(self.vision))
        self._patches = None
        return loss / len(self.bridge)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _lr_factor(cfg: PretrainConfig, step: int, start: int = 0) -> float:
    """Linear warm-up then cosine decay over steps `start`..end of the run (0 before `start`)."""
    step, total = step - start, cfg.vision_steps + cfg.steps - start
    if step < 0:
        return 0.0
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    progress = min(1.0, max(0, step - cfg.warmup) / max(1, total - cfg.warmup))
    return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + np.cos(np.pi * progress)))


def pretrain_tiny(name: str, world_dir: str, cfg: PretrainConfig | None = None, progress: bool = True,
                  callback: Callable[[int, float, object], None] | None = None):
    """Build tiny backbone `name` and train every weight on the toy world; returns the VLLM.

    Sets torch to one CPU thread (`tune_cpu_threads`). `callback(step, loss, vllm)` runs after
    every optimiser step, steps counted over both phases (phase 1 reports the auxiliary loss)."""
    cfg = cfg or config_for_world(name, world_dir)
    if cfg.vision_steps and cfg.aux_weight <= 0:
        raise ValueError("PretrainConfig: vision_steps > 0 needs aux_weight > 0 (phase 1 trains only the aux heads)")
    vllm = build_tiny_vlm(name, cfg.spec) if name in TINY_VLM_NAMES else build_tiny(name, cfg.spec)
    tune_cpu_threads(name, vllm.device)
    world = _load_world(world_dir)
    bank = _bank(vllm, world.images)
    rng = np.random.default_rng([cfg.seed, 17])
    torch.manual_seed(cfg.seed)
    vllm.model.eval().requires_grad_(True)  # eval mode: no dropout; gradients on every weight
    aux = _AuxHeads(vllm, world, cfg.aux_vision) if cfg.aux_weight > 0 else None
    groups = param_groups(vllm)
    optimizer = torch.optim.AdamW(
        [{"params": groups["lm"], "lr": cfg.lr},
         {"params": groups["vision"] + (list(aux.parameters()) if aux else []), "lr": cfg.vision_lr},
         {"params": groups["bridge"], "lr": cfg.vision_lr if cfg.bridge_lr is None else cfg.bridge_lr}],
        weight_decay=cfg.weight_decay)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        lambda s: _lr_factor(cfg, s, start=cfg.vision_steps),  # the LM learns in phase 2 only
        lambda s: _lr_factor(cfg, s), lambda s: _lr_factor(cfg, s)])
    order: list[int] = []

    def next_image() -> int:
        if not order:  # epochs over the pictures: each is seen equally often
            order.extend(int(i) for i in rng.permutation(len(world.images)))
        return order.pop()

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()

    bar = tqdm(total=cfg.vision_steps + cfg.steps, desc=f"pretraining {name}", disable=not progress)
    try:
        for step in range(cfg.vision_steps):  # phase 1: the auxiliary heads teach vision + bridge
            idx = torch.tensor([next_image() for _ in range(cfg.vision_batch)])
            loss = aux.loss(bank.encode(idx), idx)
            update(loss)
            bar.update()
            if callback is not None:
                callback(step, loss.item(), vllm)
        tokenize = functools.lru_cache(maxsize=None)(vllm._tokenize)
        for step in range(cfg.steps):  # phase 2: every weight, on the questions and text facts
            prompts, images, targets = [], [], []
            for _ in range(cfg.batch_images):
                i = next_image()
                for qtype in sorted(world.questions[i]):  # one question of each type
                    options = world.questions[i][qtype]
                    prompt, target = options[int(rng.integers(len(options)))]
                    prompts.append(prompt), images.append(i), targets.append(target)
            for j in rng.integers(len(world.text), size=cfg.text_rows):
                prompt, target = world.text[int(j)]
                prompts.append(prompt), images.append(None), targets.append(target)
            seen: dict = {}
            with bank.inputs(tokenize, seen):
                loss = _target_loss(vllm, vllm.prepare(prompts, images, targets))
            aux_w = cfg.aux_weight * max(0.0, 1.0 - step / max(1.0, cfg.aux_steps * cfg.steps))
            update(loss + aux_w * aux.loss(seen["features"], seen["indices"]) if aux_w > 0 and seen else loss)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if callback is not None:
                callback(cfg.vision_steps + step, loss.item(), vllm)
    finally:
        bar.close()
        if aux is not None:
            aux.close()
    vllm.model.eval().requires_grad_(False)
    return vllm


@torch.no_grad()
def toy_accuracy(vllm, world_dir: str, limit: int | None = None, batch_size: int = 64) -> dict[str, float]:
    """Teacher-forced token accuracy of the unedited model on the eval split's true answers
    (`alt`: the counterfactual targets, which should stay low)."""
    records = load_edit_dataset("TOY", os.path.join(world_dir, "eval.json"), world_dir, limit=limit)
    groups = {
        "image_loc": [r.locality["image_loc"][0] for r in records],
        "text_loc": [r.locality["text_loc"][0] for r in records],
        "pred": [Sample(r.requests[0].prompt, r.original_answer, r.requests[0].image) for r in records],
        "alt": [r.requests[0] for r in records],  # counterfactual targets: should be low
    }
    cache = ImageCache(max_items=4096)
    result = {}
    for key, samples in groups.items():
        correct = total = 0
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            batch = vllm.prepare([s.prompt for s in chunk], [cache.get(s.image) if s.image else None for s in chunk],
                                 [s.target for s in chunk])
            hits = (vllm(batch).argmax(-1) == batch.labels) & batch.label_mask
            correct += int(hits.sum())
            total += int(batch.label_mask.sum())
        result[key] = correct / total
    return result


def ensure_pretrained(name: str, world_dir: str, records_dir: str = "records",
                      cfg: PretrainConfig | None = None, progress: bool = True, force: bool = False) -> str:
    """Folder of the pretrained tiny backbone for this world and config; trains it on first use
    (or always, with `force`). Load it with `load_vllm(name, folder)`; its `pretrain_report.json`
    holds the training seconds, the config and the eval-split accuracies (`toy_accuracy`).

    `cfg` defaults to `config_for_world(name, world_dir)` (the defaults with the backbone's and the
    world version's overrides)."""
    cfg = cfg or config_for_world(name, world_dir)
    key = cache_key(name, read_manifest(world_dir) or {}, cfg)
    out = os.path.join(records_dir, "pretrained", f"{name}-{key}")
    if not force and os.path.isfile(os.path.join(out, "pretrain_report.json")):
        return out
    start = time.time()
    vllm = pretrain_tiny(name, world_dir, cfg, progress=progress)
    seconds = time.time() - start
    report = {"name": name, "seconds": round(seconds, 1), "config": dataclasses.asdict(cfg),
              "eval_accuracy": toy_accuracy(vllm, world_dir)}
    with folder_atomic(out) as tmp:
        save_vllm(vllm, tmp)
        write_json_atomic(os.path.join(tmp, "pretrain_report.json"), report, indent=2)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m runs.pretrain",
        description="Pretrain tiny backbones on the toy world (generated first if needed, default "
                    "sizes) with the default PretrainConfig, one CPU thread; print the training time and "
                    "the eval-split accuracies. Reuses a cached model unless --force.")
    parser.add_argument("--world", default="data/toyworld", help="toy-world folder (default: %(default)s)")
    parser.add_argument("--records", default="records", help="cache root: <records>/pretrained/ (default: %(default)s)")
    parser.add_argument("--names", nargs="+", default=list(TINY_NAMES), choices=TINY_NAMES + TINY_VLM_NAMES,
                        help="backbones (default: the three paper families)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order (default: 0)")
    parser.add_argument("--force", action="store_true", help="train again even when cached")
    ns = parser.parse_args(argv)
    try:
        world = keep_toyworld(ns.world)  # a world already there (any size, version 4 too) is kept
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name in ns.names:
        cfg = config_for_world(name, world, seed=ns.seed, spec={"seed": ns.seed})
        out = ensure_pretrained(name, world, ns.records, cfg, force=ns.force)
        with open(os.path.join(out, "pretrain_report.json")) as f:
            report = json.load(f)
        acc = " ".join(f"{k}={v:.3f}" for k, v in report["eval_accuracy"].items())
        print(f"{name}: trained in {report['seconds']:.0f} s; eval {acc}; {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
