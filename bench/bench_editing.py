"""Benchmark: LiveEdit editing, routed inference, batched evaluation and repository growth, in one run.

Prints one JSON line per figure (and writes them to `--out FILE` too). Each line that has a target
carries it as {"target": ..., "pass": bool, "target_applies": bool}; `target_applies` is false
where the target is stated for another setting (e.g. "on GPU at BLIP-2 shapes") and the figure
is only informative here. Timings are medians after warm-up (CUDA synchronised); the cases of a
comparison run interleaved, and the fastest run (`*_min_s`, `*_of_mins`) is reported alongside,
as the least-disturbed figure on a shared CPU. Peak memory (CUDA only) is
`torch.cuda.max_memory_allocated` during one forward (weights, repository, activations); its growth
at m experts is against the unedited forward with an empty repository, so the repository counts.
Null on CPU.

    "setup"                    machine, torch, shapes, threads
    "edit_latency"             one request: editor.edit([s]) vs the floor (prepare + hidden_at_layer(l_e))
    "edits_per_s"              editor.edit(list of n samples) at n = 1, 8, 32
    "batched_edit_speedup"     edits/s at the largest batch / edits/s at batch 1
    "routed_inference"         vllm(batch) with m = 0, 100, 1,000, 10,000 experts vs the unedited
                               model, batch 1 and 32; variant "routed" (random keys: hard routing
                               picks what it picks) and "all_selected" (every expert selected)
    "eval_records_per_s"       sequential evaluation at eval batch 1 and B (bench/bench_eval.py)
    "eval_batched_speedup"     their ratio
    "repository_growth"        10,000 single-edit ExpertRepository.add calls (preallocated, grows by an
                               eighth) vs naive torch.cat per edit, and as a fraction of 10,000 single edits
    "wall_time"                the whole run

"all_selected" forces hard routing without touching any code: the repository's vision keys are
set (through `repository.add`) to one key w solved by least squares so that every row's visual
similarity to w exceeds its prototype similarity by a margin (for batch 1, w is the row's own
visual features scaled up). The run checks that `editor.route` then selects every expert for
every row.

    python bench/bench_editing.py --shapes tiny --quick                 # < 3 minutes on a 2-core CPU
    python bench/bench_editing.py --shapes tiny,small --out bench/results/cpu.jsonl
    python bench/bench_editing.py --shapes blip2,llava --device cuda --out bench/results/gpu.jsonl
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.bench_eval import measure as measure_eval  # noqa: E402
from editors.liveedit.config import LiveEditConfig, RetrievalEditorConfig, TrainConfig  # noqa: E402
from editors.liveedit.editor import LiveEdit  # noqa: E402
from editors.liveedit.repository import FIELDS, ExpertRepository  # noqa: E402
from editors.liveedit.features import prototype_similarity, visual_features  # noqa: E402
from editors.liveedit.routing import gather_spans  # noqa: E402
from utils.config import load_config  # noqa: E402
from runs.results import round_floats  # noqa: E402
from utils.records import Sample  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "liveedit")
SHAPES = ("tiny", "small", "blip2", "llava")
GPU_SHAPES = ("blip2", "llava")

# the targets
EDIT_LATENCY_MAX = 1.15          # single edit / forward to l_e (incl. prepare), batch 1
BATCHED_EDIT_MIN = 8.0           # edits/s at batch 32 / at batch 1 (GPU, BLIP-2 shapes)
OVERHEAD_MAX = {1: 0.15, 32: 0.05}  # routed inference at 1,000 experts, by batch size
MEMORY_GROWTH_MAX = 0.10         # peak memory at 10,000 experts vs the unedited forward
EVAL_SPEEDUP_MIN = {"cuda": 5.0, "cpu": 2.0}
GROWTH_FRACTION_MAX = 0.01       # 10,000 repository adds / 10,000 single edits

PROMPTS = ("what color is the shape in the picture?", "how many shapes are shown in this image?",
           "which shape is in the photo?", "what is the color of the object?",
           "what shape do you see?", "how many objects are there?")
TARGETS = ("red", "two", "circle", "blue", "a square", "three")


# ---- settings ------------------------------------------------------------------------------------
def settings(args) -> SimpleNamespace:
    """Sizes of every section: full, --quick (CPU < 3 min for tiny) and --smoke (tests)."""
    s = SimpleNamespace(warmup=2, repeats=7, latency_repeats=30, edit_batches=(1, 8, 32),
                        inference_batches=(1, 32), experts=(0, 100, 1000, 10000), eval_records=64, eval_sen=8,
                        eval_batch=args.eval_batch_size, growth_n=10000, naive_cap_s=None, min_time_s=1.0)
    if args.quick:  # naive torch.cat stops after 40 s and is extrapolated (64 s for all 10,000 on tiny)
        s.warmup, s.repeats, s.latency_repeats, s.eval_records, s.naive_cap_s = 2, 5, 20, 16, 40.0
        s.min_time_s = 0.25
    if args.smoke:
        s.warmup, s.repeats, s.latency_repeats, s.min_time_s = 1, 1, 2, 0.0
        s.edit_batches, s.inference_batches, s.experts = (1, 4), (1, 4), (0, 100)
        s.eval_records, s.eval_sen, s.eval_batch, s.growth_n = 4, 2, 4, 200
    return s


# ---- building --------------------------------------------------------------------------------------
@contextlib.contextmanager
def default_device_dtype(device: torch.device, dtype: torch.dtype):
    """Create parameters directly on `device` in `dtype` (nothing is materialised on the CPU first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def small_spec():
    from editors.vllms.tiny import TinySpec

    return TinySpec(hidden_size=256, num_layers=8, num_heads=8, vision_hidden_size=256, vision_layers=4,
                    image_size=64, patch_size=8, num_query_tokens=32)


def small_config() -> LiveEditConfig:
    """tiny-blip2.yaml scaled to the small backbone: l_e at ~2/3 depth as in the paper (21 of 32)."""
    return LiveEditConfig(edit_layer_i=5,
                          retrieval_editor=RetrievalEditorConfig(module_dim=256, cross_att_head_n=8, lora_rank=4,
                                                                 eqe_n=4, lora_scale=5.0),
                          train_cfg=TrainConfig(lr=1e-4), repository_dtype="float32")


def build_blip2_shapes(device, dtype, layers=None):
    """BLIP-2 OPT-2.7B shapes with random weights (`layers` shrinks every stack, for smoke runs)."""
    from transformers import BlipImageProcessorPil, Blip2Config, Blip2ForConditionalGeneration

    from editors.vllms.blip2 import BLIP2
    from editors.vllms.tokenizer import train_tokenizer

    tok = train_tokenizer(1024)  # ids < 1024 < vocab: any tokenizer works with random weights
    cfg = Blip2Config(
        vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=layers or 39,
                           num_attention_heads=16, image_size=224, patch_size=14,
                           initializer_range=0.02),  # the 1e-10 default leaves a random encoder dead
        qformer_config=dict(hidden_size=768, num_hidden_layers=layers or 12, num_attention_heads=12,
                            intermediate_size=3072, encoder_hidden_size=1408, cross_attention_frequency=2),
        text_config=dict(model_type="opt", vocab_size=50272, hidden_size=2560, num_hidden_layers=layers or 32,
                         ffn_dim=10240, num_attention_heads=32, max_position_embeddings=2048,
                         word_embed_proj_dim=2560, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        num_query_tokens=32, image_token_index=tok.unk_token_id)
    with default_device_dtype(device, dtype):
        model = Blip2ForConditionalGeneration(cfg)
        torch.nn.init.normal_(model.query_tokens, std=0.02)  # transformers zero-initialises them
    proc = BlipImageProcessorPil(size={"height": 224, "width": 224}, resample=Image.BICUBIC,
                                 image_mean=[0.48145466, 0.4578275, 0.40821073],
                                 image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
    return BLIP2(model.to(device, dtype), tok, proc, name="blip2-opt-2.7b"), 224


def build_llava_shapes(device, dtype, layers=None):
    """LLaVA-1.5-7B shapes (Llama 4096 x 32, CLIP ViT-L/14-336 -> 576 image tokens), random weights."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration

    from editors.vllms.llava import LLaVA
    from editors.vllms.tokenizer import train_tokenizer

    tok = train_tokenizer(1024)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=layers or 24, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768),
        text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=layers or 32, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False),
        image_token_index=tok.unk_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=576)
    with default_device_dtype(device, dtype):
        model = LlavaForConditionalGeneration(cfg)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_mean=[0.48145466, 0.4578275, 0.40821073],
                                 image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
    return LLaVA(model.to(device, dtype), tok, proc, name="llava-v1.5-7b"), 336


def build(shape: str, device: torch.device, dtype: torch.dtype, smoke: bool):
    """(vllm, LiveEdit, image size) for one --shapes entry."""
    from editors.vllms.tiny import TinySpec, build_tiny

    if shape == "tiny":
        vllm, image_size = build_tiny("tiny-blip2", TinySpec(), device=device), TinySpec().image_size
        config = load_config(LiveEditConfig, os.path.join(CONFIGS, "tiny-blip2.yaml"))
    elif shape == "small":
        spec = small_spec()
        vllm, image_size, config = build_tiny("tiny-blip2", spec, device=device), spec.image_size, small_config()
    elif shape in GPU_SHAPES:
        builder = build_blip2_shapes if shape == "blip2" else build_llava_shapes
        vllm, image_size = builder(device, dtype, layers=2 if smoke else None)
        yaml_name = "blip2-opt-2.7b.yaml" if shape == "blip2" else "llava-v1.5-7b.yaml"
        config = load_config(LiveEditConfig, os.path.join(CONFIGS, yaml_name))
        config.edit_layer_i = min(config.edit_layer_i, vllm.num_layers - 1)
    else:
        raise ValueError(f"unknown shapes {shape!r}; choose from {SHAPES}")
    if shape in ("tiny", "small") and dtype != torch.float32:
        vllm = vllm.to(dtype)
    torch.manual_seed(0)
    return vllm, LiveEdit(vllm, config), image_size  # editor modules in float32, as load_editor makes them


def make_samples(n: int, image_size: int, seed: int = 0) -> list[Sample]:
    """n image requests with varied prompts and random pixels."""
    rng = np.random.default_rng(seed)
    return [Sample(PROMPTS[i % len(PROMPTS)] + " The answer is:", TARGETS[i % len(TARGETS)],
                   Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)))
            for i in range(n)]


# ---- timing ----------------------------------------------------------------------------------------
class Clock:
    """Wall-clock timing with CUDA synchronisation, and peak memory on CUDA (None on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def interleaved(self, cases: dict, warmup: int, repeats: int, min_time_s: float = 0.0,
                    max_repeats: int = 200) -> dict[str, float]:
        """Median seconds of each case; cases run in turn every repeat so that drift hits all alike.

        `cases` maps a name to (fn, pre, post): pre/post (untimed, may be None) set up and undo.
        At least `repeats` timed rounds, more (up to `max_repeats`) until every case has run for
        `min_time_s` in total: cheap cases get many samples, so the median resists noise.
        """
        times = {name: [] for name in cases}
        i = 0
        while True:
            for name, (fn, pre, post) in cases.items():
                if pre:
                    pre()
                self.sync()
                start = time.perf_counter()
                fn()
                self.sync()
                elapsed = time.perf_counter() - start
                if post:
                    post()
                if i >= warmup:
                    times[name].append(elapsed)
            i += 1
            done = i - warmup
            if done >= max_repeats or (done >= repeats and all(sum(t) >= min_time_s for t in times.values())):
                break
        self.last_repeats = i - warmup
        self.last_min = {name: min(t) for name, t in times.items()}  # the least-disturbed run (shared CPUs)
        return {name: statistics.median(t) for name, t in times.items()}

    def peak_memory(self, fn) -> dict | None:
        """Peak bytes allocated while `fn` runs: total (weights, repository, activations) and above the start."""
        if not self.cuda:
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_bytes": peak, "peak_above_start_bytes": peak - start, "resident_bytes": start}


class Report:
    """One JSON line per figure, on stdout and in the `--out` file (if any)."""

    def __init__(self, common: dict, file=None):
        self.common, self.file = common, file

    def emit(self, what: str, **fields) -> dict:
        line = round_floats({"what": what, **self.common, **fields})
        text = json.dumps(line)
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()
        return line


def target(rule: str, passed, applies: bool, note: str | None = None) -> dict:
    out = {"target": rule, "pass": None if passed is None else bool(passed), "target_applies": applies}
    if note:
        out["target_note"] = note
    return out


# ---- 1. editing --------------------------------------------------------------------------------------
@torch.no_grad()
def bench_editing(ctx) -> float:
    """Single-edit latency vs the forward to l_e, and edits/s by batch size; returns the single-edit seconds."""
    vllm, editor, clock, s = ctx.vllm, ctx.editor, ctx.clock, ctx.settings
    l_e = editor.config.edit_layer_i
    pool = make_samples(max(s.edit_batches), ctx.image_size, seed=1)
    state = {"i": 0}

    def sample():
        return pool[state["i"] % len(pool)]

    def floor():
        x = sample()
        vllm.hidden_at_layer(vllm.prepare([x.prompt], [x.image], [x.target]), l_e)

    def next_sample():
        state["i"] += 1
        editor.restore()

    editor.restore()  # empty repository: the editor's hook does nothing during the floor
    t = clock.interleaved({"floor": (floor, None, None), "edit": (lambda: editor.edit([sample()]), None, next_sample)},
                          s.warmup, s.latency_repeats, s.min_time_s)
    single_edit_s, ratio = t["edit"], t["edit"] / t["floor"]
    low = clock.last_min
    ctx.report.emit("edit_latency", batch_size=1, edit_s=t["edit"], floor_s=t["floor"], ratio=ratio,
                    edit_min_s=low["edit"], floor_min_s=low["floor"], ratio_of_mins=low["edit"] / low["floor"],
                    floor_is="vllm.prepare + vllm.hidden_at_layer(batch, l_e)", edit_layer=l_e,
                    repeats=clock.last_repeats,
                    **target(f"edit <= {EDIT_LATENCY_MAX}x floor", ratio <= EDIT_LATENCY_MAX, True))

    cases = {n: (lambda n=n: editor.edit(pool[:n]), None, editor.restore) for n in s.edit_batches}
    t = clock.interleaved(cases, s.warmup, s.repeats, s.min_time_s)
    rates = {n: n / t[n] for n in s.edit_batches}
    for n in s.edit_batches:
        ctx.report.emit("edits_per_s", batch_size=n, edits_per_s=rates[n], call_s=t[n],
                        call_min_s=clock.last_min[n], repeats=clock.last_repeats)
    big = max(s.edit_batches)
    speedup = rates[big] / rates[1]
    applies = ctx.device.type == "cuda" and ctx.shape == "blip2"
    ctx.report.emit("batched_edit_speedup", batch_sizes=[1, big], value=speedup,
                    **target(f">= {BATCHED_EDIT_MIN}x (GPU, BLIP-2 shapes)", speedup >= BATCHED_EDIT_MIN, applies))
    return single_edit_s


# ---- 2. routed inference ------------------------------------------------------------------------------
def reference_stats(editor, samples) -> dict[str, float]:
    """Std of each repository field over real edits, so random experts have realistic magnitudes."""
    vllm = editor.vllm
    batch = vllm.prepare([x.prompt for x in samples], [x.image for x in samples], [x.target for x in samples])
    keys = editor.make_edit_keys(editor.edit_layer_output(batch), batch)
    return {name: float(keys[name].float().std()) for name in FIELDS}


def repository_bytes(repo: ExpertRepository, rows: int) -> int:
    """Bytes of `rows` experts (keys and factors) in the repository's dtype."""
    per_expert = sum(torch.Size(shape).numel() for shape in repo.shapes.values())
    return rows * per_expert * torch.empty(0, dtype=repo.dtype).element_size()


def random_fields(repo: ExpertRepository, m: int, stds: dict, device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(1234 + m)
    return {name: torch.randn(m, *repo.shapes[name], generator=gen, device=device) * stds[name] for name in FIELDS}


def forcing_key(editor, batch) -> torch.Tensor:
    """One vision key [e, md] that every image row of `batch` routes to (beats its prototype by a margin)."""
    ext, dtype = editor.inpt_extractor, editor.instant_reps_norm.weight.dtype
    hidden = editor.edit_layer_output(batch).to(dtype)
    rows = batch.has_image.nonzero().flatten()
    h = hidden[rows]
    vision, vision_mask = gather_spans(h, batch.vision_spans[rows])
    query, query_mask = gather_spans(h, batch.query_spans[rows])
    visual, summary = visual_features(ext, query, query_mask, vision, vision_mask)  # [k, e, md], as `route`
    proto = prototype_similarity(ext, visual, query, query_mask, summary, editor.sim_scale).float()  # [k]
    visual = visual.float()
    e = visual.shape[1]
    margin = float(proto.abs().max()) + 1.0
    wanted = (proto + margin) * e / editor.sim_scale  # <visual_k, w> for each row k
    # minimum-norm exact solution (k <= e*md rows); float64 on the CPU (CUDA lstsq is overdetermined-only)
    w = torch.linalg.lstsq(visual.flatten(1).double().cpu(), wanted[:, None].double().cpu(), driver="gelsd").solution
    return w.to(visual.device, torch.float32).view(*visual.shape[1:])  # [e, md]


def selection(editor, batch) -> dict:
    """What hard routing selects for `batch`: mean experts per image row, union, rows with any."""
    hidden = editor.edit_layer_output(batch)
    rows, experts, weights = editor.route(hidden, batch)
    n_image = int(batch.has_image.sum())
    per_row = (weights > 0).sum(1).float() if len(rows) else torch.zeros(0)
    return {"selected_mean": float(per_row.sum()) / max(n_image, 1), "selected_union": int(len(experts)),
            "rows_routed": int(len(rows)), "image_rows": n_image}


@torch.no_grad()
def bench_inference(ctx) -> None:
    vllm, editor, clock, s, repo = ctx.vllm, ctx.editor, ctx.clock, ctx.settings, ctx.editor.repository
    stds = reference_stats(editor, make_samples(8, ctx.image_size, seed=2))
    unedited = contextlib.ExitStack()

    def detach():  # the unedited model: every layer edit off (its hook only checks a flag)
        unedited.enter_context(vllm.unedited())

    def attach():
        unedited.close()

    for b in s.inference_batches:
        samples = make_samples(b, ctx.image_size, seed=3)
        batch = vllm.prepare([x.prompt for x in samples], [x.image for x in samples], [x.target for x in samples])
        forced = forcing_key(editor, batch)
        editor.restore()
        forward = lambda: vllm(batch)  # noqa: E731
        detach()
        unedited_memory = clock.peak_memory(forward)  # the unedited model: no hook, empty repository
        attach()
        for m in s.experts:
            for variant in (("routed",) if m == 0 else ("routed", "all_selected")):
                editor.restore()
                if m:
                    fields = random_fields(repo, m, stds, ctx.device)
                    if variant == "all_selected":
                        fields["vision_keys"] = forced.expand(m, -1, -1).clone()
                    for i in range(m):  # one by one, as sequential editing grows the repository
                        repo.add([ctx.placeholder], **{name: value[i:i + 1] for name, value in fields.items()})
                    del fields
                chosen = selection(editor, batch)
                if variant == "all_selected" and (chosen["selected_union"] != m or chosen["rows_routed"] != b):
                    raise RuntimeError(f"forcing hard routing failed: {chosen}")
                t = clock.interleaved({"unedited": (forward, detach, attach), "edited": (forward, None, None)},
                                      s.warmup, s.repeats, s.min_time_s)
                overhead, low = t["edited"] / t["unedited"] - 1.0, clock.last_min
                line = dict(experts=m, batch_size=b, variant=variant, edited_s=t["edited"],
                            unedited_s=t["unedited"], overhead=overhead, edited_min_s=low["edited"],
                            unedited_min_s=low["unedited"], overhead_of_mins=low["edited"] / low["unedited"] - 1.0,
                            seq_len=batch.length, **chosen,
                            repository_bytes=repository_bytes(repo, len(repo)),
                            repository_allocated_bytes=repository_bytes(repo, repo.capacity),
                            repeats=clock.last_repeats)
                if clock.cuda:  # growth includes the repository: the unedited peak is the empty one's
                    mem = clock.peak_memory(forward)
                    growth = mem["peak_bytes"] / unedited_memory["peak_bytes"] - 1.0
                    line.update(peak_bytes=mem["peak_bytes"], unedited_peak_bytes=unedited_memory["peak_bytes"],
                                peak_growth=growth, activation_peak_bytes=mem["peak_above_start_bytes"],
                                unedited_activation_peak_bytes=unedited_memory["peak_above_start_bytes"])
                else:
                    growth = None
                    line.update(peak_bytes=None, unedited_peak_bytes=None, peak_growth=None,
                                memory_note="CPU: peak memory not measured (torch has no CPU allocator peak)")
                if m == 1000 and b in OVERHEAD_MAX:
                    line.update(target(f"overhead <= {OVERHEAD_MAX[b]:.0%} at 1,000 experts, batch {b}",
                                       overhead <= OVERHEAD_MAX[b], True))
                elif m == 10000:
                    line.update(target(f"peak-memory growth <= {MEMORY_GROWTH_MAX:.0%} at 10,000 experts",
                                       None if growth is None else growth <= MEMORY_GROWTH_MAX, clock.cuda,
                                       None if clock.cuda else "not measured on CPU"))
                ctx.report.emit("routed_inference", **line)
    editor.restore()
    gc.collect()


# ---- 3. sequential evaluation ----------------------------------------------------------------------------
def bench_eval(ctx) -> None:
    """bench/bench_eval.py's `measure` at eval batch 1 and B, with this run's LiveEdit."""
    from utils.data import load_edit_dataset
    from toyworld.world import generate_toyworld

    s = ctx.settings
    with tempfile.TemporaryDirectory() as workdir:
        world = os.path.join(workdir, "toyworld")
        generate_toyworld(world, n_train=2, n_eval=s.eval_records, n_pretrain_scenes=2)
        records = load_edit_dataset("TOY", os.path.join(world, "eval.json"), world)
        args = SimpleNamespace(sen=s.eval_sen, workdir=workdir, no_exact_match=False)
        ctx.editor.restore()
        single, numbers_1 = measure_eval(ctx.editor, records, args, 1)
        ctx.report.emit(**single)
        batched, numbers_b = measure_eval(ctx.editor, records, args, s.eval_batch)
        ctx.report.emit(**batched)
    ctx.editor.restore()
    speedup = batched["records_per_s"] / single["records_per_s"]
    minimum = EVAL_SPEEDUP_MIN["cuda" if ctx.device.type == "cuda" else "cpu"]
    applies = (ctx.device.type == "cpu" and ctx.shape == "tiny") or (
        ctx.device.type == "cuda" and ctx.shape == "blip2")
    rule = f">= {minimum}x " + ("(GPU, BLIP-2 shapes)" if ctx.device.type == "cuda" else "(CPU, tiny backbone)")
    ctx.report.emit("eval_batched_speedup", value=speedup, batch_sizes=[1, s.eval_batch],
                    same_numbers=numbers_1 == numbers_b, records=len(records), editor="liveedit",
                    **target(rule, speedup >= minimum, applies))


# ---- 4. repository growth ----------------------------------------------------------------------------------
class ConcatRepository:
    """The paper's way: torch.cat of every field on every edit (O(n^2) copying over n edits)."""

    def __init__(self, like: ExpertRepository):
        self.store = {n: torch.empty(0, *like.shapes[n], dtype=like.dtype, device=like.device) for n in FIELDS}
        self.requests = []

    def add(self, requests, **fields) -> None:
        for name in FIELDS:
            self.store[name] = torch.cat([self.store[name], fields[name].detach().to(self.store[name].dtype)])
        self.requests.extend(requests)


@torch.no_grad()
def bench_growth(ctx, single_edit_s: float) -> None:
    """n single-edit adds into the repository vs torch.cat per edit, timed every 100 edits."""
    s, clock, like = ctx.settings, ctx.clock, ctx.editor.repository
    one = {name: torch.randn(1, *like.shapes[name], device=like.device) for name in FIELDS}
    request, step = [ctx.placeholder], 100

    def new_repo():
        return ExpertRepository(*like.shapes["query_keys"], *like.shapes["up"], dtype=like.dtype, device=like.device)

    def run(repo, n: int, cap_s: float | None = None) -> dict[int, float]:
        """Cumulative seconds after every `step` adds (and after n); stops early past cap_s."""
        clock.sync()
        start, marks = time.perf_counter(), {}
        for i in range(1, n + 1):
            repo.add(request, **one)
            if i % step == 0 or i == n:
                clock.sync()
                marks[i] = time.perf_counter() - start
                if cap_s is not None and marks[i] > cap_s:
                    break
        return marks

    run(new_repo(), step)  # warm-up
    repo = new_repo()
    marks = run(repo, s.growth_n)
    naive = run(ConcatRepository(like), s.growth_n, s.naive_cap_s)
    naive_n = max(naive)
    repo_s, naive_s = marks[s.growth_n], naive[naive_n]
    total_edit_s = s.growth_n * single_edit_s
    fraction = repo_s / total_edit_s
    line = dict(edits=s.growth_n, repository_s=repo_s, repository_per_add_us=repo_s / s.growth_n * 1e6,
                final_capacity=repo.capacity, naive_cat_edits=naive_n, naive_cat_s=naive_s,
                repository_s_at_naive_edits=marks[naive_n], total_edit_s=total_edit_s, single_edit_s=single_edit_s,
                repository_fraction=fraction, dtype=str(like.dtype).replace("torch.", ""))
    if naive_n == s.growth_n:
        line.update(naive_cat_fraction=naive_s / total_edit_s, naive_over_repository=naive_s / repo_s)
    else:  # edit i copies i rows: at least quadratic, so this is a lower bound
        estimate = naive_s * (s.growth_n / naive_n) ** 2
        line.update(naive_cat_s_extrapolated=estimate, naive_cat_fraction_extrapolated=estimate / total_edit_s,
                    naive_note=f"naive torch.cat stopped after {naive_n} edits ({s.naive_cap_s:.0f} s cap of "
                               "--quick); the 10,000-edit figure is a quadratic extrapolation (a lower bound)")
    rule = f"repository adds <= {GROWTH_FRACTION_MAX:.0%} of total edit time"
    ctx.report.emit("repository_growth", **line, **target(rule, fraction <= GROWTH_FRACTION_MAX, True))


# ---- main -------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_shape(shape: str, args, s, device, dtype, start: float) -> None:
    clock = Clock(device)
    vllm, editor, image_size = build(shape, device, dtype, args.smoke)
    n_params = sum(p.numel() for p in vllm.parameters())
    common = {"shapes": shape, "device": str(device), "model": vllm.name}
    report = Report(common, args.out_file)
    report.emit("setup", **machine(), threads=torch.get_num_threads(), dtype=str(vllm.dtype).replace("torch.", ""),
                params=n_params, hidden=vllm.hidden_size, layers=vllm.num_layers, image_tokens=vllm.num_image_tokens,
                edit_layer=editor.config.edit_layer_i, module_dim=editor.config.retrieval_editor.module_dim,
                rank=editor.config.retrieval_editor.lora_rank, repository_dtype=editor.config.repository_dtype,
                quick=args.quick, smoke=args.smoke, build_s=time.perf_counter() - start)
    ctx = SimpleNamespace(shape=shape, device=device, vllm=vllm, editor=editor, clock=clock, settings=s,
                          image_size=image_size, report=report,
                          placeholder=Sample("placeholder", "placeholder", None))
    single_edit_s = bench_editing(ctx)
    bench_inference(ctx)
    bench_eval(ctx)
    bench_growth(ctx, single_edit_s)
    editor.remove()
    del ctx, vllm, editor
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="tiny", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda for blip2/llava, else cpu)")
    p.add_argument("--dtype", default=None, help="backbone dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and records (tiny on CPU: < 3 minutes)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: everything shrunk
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: MKL pays ~11 ms per new GEMM shape with 2 threads on "
                        "small CPUs, see docs/PERFORMANCE.md; 0 = torch default)")
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    args = p.parse_args(argv)

    from utils.devices import resolve_device, resolve_dtype
    from utils.errors import UserError

    shapes = [x.strip() for x in args.shapes.split(",") if x.strip()]
    unknown = [x for x in shapes if x not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    try:
        device = resolve_device(args.device or ("cuda" if any(x in GPU_SHAPES for x in shapes) else "cpu"))
        dtype = resolve_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    except UserError as exc:
        p.error(str(exc))
    if device.type == "cpu" and any(x in GPU_SHAPES for x in shapes) and not args.smoke:
        p.error("blip2/llava shapes are billions of parameters: run them with --device cuda")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    s = settings(args)
    args.out_file = None
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        args.out_file = open(args.out, "w")
    start = time.perf_counter()
    try:
        for shape in shapes:
            run_shape(shape, args, s, device, dtype, time.perf_counter())
        end = Report({"shapes": ",".join(shapes), "device": str(device)}, args.out_file)
        end.emit("wall_time", seconds=time.perf_counter() - start, quick=args.quick, smoke=args.smoke)
    finally:
        if args.out_file:
            args.out_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
