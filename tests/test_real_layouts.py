"""Real-layout weight folders of BLIP-2 and LLaVA: sharded fp16 files, old and new key names, broken folders.

Tiny models are written as the real downloads are laid out (`model-0000i-of-0000n.safetensors` or
`pytorch_model-0000i-of-0000n.bin` shards named by an index json, fp16 weights, tokenizer and
preprocessor files side by side) and loaded through `load_vllm`; logits are compared with plain
transformers loading the same folder. The key names are spelled out here by hand.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

from conftest import make_image
from editors.vllms import MARKER_FILE, build_tiny, load_vllm, save_vllm
from utils.devices import resolve_dtype
from utils.errors import UserError

PROMPT, TARGET = "what color is the shape? The answer is:", "red"


# ---- writing real layouts ---------------------------------------------------------------------

def fp16_source(name: str):
    """A tiny backbone whose weights are exactly representable in fp16 (real folders ship fp16)."""
    vllm = build_tiny(name)
    with torch.no_grad():
        for p in vllm.model.parameters():
            p.copy_(p.half().float())
    return vllm


def llava_old_name(key: str) -> str:
    """transformers-5 module key -> the llava-hf 2023 checkpoint key (`language_model.model.*`, ...)."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if key.startswith(new):
            return old + key[len(new):]
    raise AssertionError(key)


def llava_new_name(key: str) -> str:
    """transformers-5 module key -> the key transformers 4.52-4.57 wrote (CLIP still under `vision_model`)."""
    return key.replace("model.vision_tower.", "model.vision_tower.vision_model.")


def write_folder(vllm, folder: str, state: dict[str, torch.Tensor], fmt: str = "safetensors", shards: int = 2) -> None:
    """`vllm`'s config, tokenizer and processor files plus `state` as fp16 shards with an index json."""
    save_vllm(vllm, folder)
    for name in (MARKER_FILE, "model.safetensors"):
        os.remove(os.path.join(folder, name))
    keys = list(state)
    weight_map, total = {}, 0
    for i in range(shards):
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        stem = "model" if fmt == "safetensors" else "pytorch_model"
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.{'safetensors' if fmt == 'safetensors' else 'bin'}"
        tensors = {k: (state[k].half() if state[k].is_floating_point() else state[k]).contiguous() for k in part}
        if fmt == "safetensors":
            save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        else:
            torch.save(tensors, os.path.join(folder, file))
        weight_map.update({k: file for k in part})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    with open(os.path.join(folder, index), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def layouts(vllm, variant: str) -> dict[str, torch.Tensor]:
    state = vllm.model.state_dict()
    if variant == "blip2":  # Salesforce/blip2-opt-2.7b names = the module's; lm_head tied to the embeddings
        return state
    if variant == "blip2-no-lm-head":
        return {k: v for k, v in state.items() if k != "language_model.lm_head.weight"}
    if variant == "llava-old":  # + the per-layer rotary buffers 2023 Llama checkpoints carried
        out = {llava_old_name(k): v for k, v in state.items()}
        head = vllm.model.config.text_config.head_dim
        for i in range(vllm.model.config.text_config.num_hidden_layers):
            out[f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = \
                1.0 / 10000 ** (torch.arange(0, head, 2).float() / head)
        return out
    if variant == "llava-new":
        return {llava_new_name(k): v for k, v in state.items()}
    raise AssertionError(variant)


@pytest.fixture(scope="module")
def sources():
    return {"blip2": fp16_source("tiny-blip2"), "llava": fp16_source("tiny-llava")}


def family_of(variant: str) -> str:
    return variant.split("-")[0]


@pytest.fixture
def folder(sources, tmp_path, request):
    """(family, folder) written in the layout `request.param` = (variant, fmt)."""
    variant, fmt = request.param
    path = str(tmp_path / variant)
    vllm = sources[family_of(variant)]
    write_folder(vllm, path, layouts(vllm, variant), fmt)
    return family_of(variant), path


def shards(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin")))


# ---- loading real layouts ---------------------------------------------------------------------

def plain_logits(hf_model, vllm, image_token_id: int) -> torch.Tensor:
    """Logits of plain transformers for the same row: image placeholders where the vllm puts features."""
    batch = vllm.prepare([PROMPT], [make_image(3)], [TARGET])
    ids = batch.token_ids[0].clone()  # [l], -1 in the vision span
    assert int((ids < 0).sum()) == vllm.num_image_tokens
    ids[ids < 0] = image_token_id
    out = hf_model(input_ids=ids[None], pixel_values=vllm.pixel_values([make_image(3)]),
                   attention_mask=batch.attention_mask)
    return out.logits  # [1, l, V]


LAYOUTS = [("blip2", "safetensors"), ("blip2-no-lm-head", "safetensors"), ("blip2", "bin"),
           ("llava-old", "safetensors"), ("llava-new", "safetensors"), ("llava-old", "bin")]


@torch.no_grad()
@pytest.mark.parametrize("folder", LAYOUTS, indirect=True, ids=["-".join(x) for x in LAYOUTS])
def test_real_layout_loads_with_the_logits_of_plain_transformers(sources, folder):
    family, path = folder
    loaded = load_vllm(family, path=path)  # UserError on any missing / unexpected key beyond the allow-list
    assert loaded.name == {"blip2": "blip2-opt-2.7b", "llava": "llava-v1.5-7b"}[family]
    source = sources[family]
    hf_class = {"blip2": Blip2ForConditionalGeneration, "llava": LlavaForConditionalGeneration}[family]
    plain = hf_class.from_pretrained(path, dtype=torch.float32).eval()
    batch = loaded.prepare([PROMPT], [make_image(3)], [TARGET])
    ours = loaded(batch)
    torch.testing.assert_close(ours, plain_logits(plain, loaded, plain.config.image_token_id), atol=1e-5, rtol=1e-5)
    # every tensor came from the folder: equal to the fp16-exact source, not re-initialised
    torch.testing.assert_close(ours, source(source.prepare([PROMPT], [make_image(3)], [TARGET])), atol=1e-5, rtol=0)


# ---- weights that do not fill the model ---------------------------------------------------------

def edit_shards(path: str, change) -> None:
    """Apply `change(state) -> state` to every safetensors shard and rewrite the index to match."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    from safetensors.torch import load_file

    weight_map = {}
    for name in shards(path):
        state = change(load_file(os.path.join(path, name)), name)
        save_file(state, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in state})
    index["weight_map"] = weight_map
    with open(index_path, "w") as f:
        json.dump(index, f)


MISSING_KEY = "language_model.model.decoder.layers.1.fc1.weight"


@pytest.mark.parametrize("folder", [("blip2", "safetensors")], indirect=True)
@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_weights_that_do_not_fill_the_model_are_refused_naming_the_keys(folder, case):
    _, path = folder

    def change(state, name):
        if case == "missing":
            state.pop(MISSING_KEY, None)
        elif name == shards(path)[0] and case == "unexpected":
            state["language_model.model.decoder.layers.0.adapter.weight"] = torch.zeros(2, dtype=torch.float16)
        elif case == "shape" and "language_projection.weight" in state:
            w = state["language_projection.weight"]
            state["language_projection.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1, dtype=w.dtype)
        return state

    edit_shards(path, change)
    want = {"missing": r"missing keys 1 \(" + MISSING_KEY.replace(".", r"\."),
            "unexpected": r"unexpected keys 1 \(language_model\.model\.decoder\.layers\.0\.adapter\.weight",
            "shape": r"other shapes .*language_projection\.weight"}[case]
    with pytest.raises(UserError, match=want):
        load_vllm("blip2", path=path)


@pytest.mark.parametrize("folder", [("llava-new", "safetensors")], indirect=True)
def test_missing_untied_lm_head_is_refused(folder):
    _, path = folder
    edit_shards(path, lambda state, name: {k: v for k, v in state.items() if k != "lm_head.weight"})
    with pytest.raises(UserError, match=r"missing keys 1 \(lm_head\.weight"):
        load_vllm("llava", path=path)


# ---- missing and broken files: one line naming the file, before the weights are read -------------

def _remove(path, *names):
    for name in names:
        os.remove(os.path.join(path, name))


def _truncate(path, name):
    file = os.path.join(path, name)
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)


BROKEN = {
    "no tokenizer": (lambda p: _remove(p, "tokenizer.json"), r"no tokenizer files in .*tokenizer\.json"),
    "no preprocessor_config.json": (lambda p: _remove(p, "preprocessor_config.json"),
                                    r"no preprocessor_config\.json in"),
    "missing shard": (lambda p: _remove(p, shards(p)[1]), r"weight file missing: .*-00002-of-00002\..*named in"),
    "truncated shard": (lambda p: _truncate(p, shards(p)[0]), r"truncated.*-00001-of-00002"),
    "no weights": (lambda p: _remove(p, *shards(p), *[i for i in os.listdir(p) if i.endswith("index.json")]),
                   r"no weights in .*model\.safetensors"),
}


@pytest.mark.parametrize("folder", [("blip2", "safetensors"), ("blip2", "bin")], indirect=True,
                         ids=["safetensors", "bin"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folder_is_a_user_error_naming_the_file(folder, case):
    _, path = folder
    breaks, message = BROKEN[case]
    breaks(path)
    with pytest.raises(UserError, match=message):
        load_vllm("blip2", path=path)


@pytest.mark.parametrize("folder", [("blip2", "safetensors")], indirect=True)
def test_file_checks_come_before_the_weights_are_read(folder):
    """A folder with a missing tensor AND no tokenizer: the cheap tokenizer check speaks first."""
    _, path = folder
    edit_shards(path, lambda state, name: {k: v for k, v in state.items() if k != MISSING_KEY})
    _remove(path, "tokenizer.json")
    with pytest.raises(UserError, match="no tokenizer files"):
        load_vllm("blip2", path=path)


@pytest.mark.parametrize("folder", [("blip2", "safetensors")], indirect=True)
def test_cli_reports_a_broken_folder_in_one_line(folder, tmp_path, capsys):
    import test_vllm_edit
    from toyworld.world import generate_toyworld

    _, path = folder
    _truncate(path, shards(path)[1])
    generate_toyworld(str(tmp_path / "data" / "toyworld"), n_train=2, n_eval=2, n_pretrain_scenes=2)
    rc = test_vllm_edit.main(["-en", "none", "-mn", "blip2", "-sen", "1", "-dn", "toy", "--model_path", path,
                              "--data_dir", str(tmp_path / "data"), "--results_dir", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and shards(path)[1] in err and "again" in err


# ---- dtype --------------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("folder", [("blip2", "safetensors"), ("llava-old", "bin")], indirect=True,
                         ids=["blip2", "llava"])
def test_dtype_bfloat16_reads_every_backbone_parameter_in_bfloat16(folder):
    """What `--dtype bfloat16` passes down: the README's bf16 memory figures assume 2 bytes per parameter."""
    family, path = folder
    vllm = load_vllm(family, path=path, device="cpu", dtype="bfloat16")
    params = list(vllm.model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert sum(p.numel() * p.element_size() for p in params) == 2 * sum(p.numel() for p in params)
    logits = vllm(vllm.prepare([PROMPT], [make_image(3)], [TARGET]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_dtype_flag_on_both_scripts():
    from runs.cli import build_parser, from_args
    from runs.eval_config import EvalConfig
    from runs.train_config import TrainRunConfig

    for cls, required in ((EvalConfig, ["-sen", "1", "-en", "none", "-mn", "blip2", "-dn", "toy"]),
                          (TrainRunConfig, ["-en", "liveedit", "-mn", "blip2", "-dna", "toy", "-bs", "2"])):
        parser = build_parser(cls)
        assert from_args(cls, parser.parse_args(required)).dtype == "auto"
        assert from_args(cls, parser.parse_args(required + ["--dtype", "bfloat16"])).dtype == "bfloat16"
        with pytest.raises(SystemExit):
            parser.parse_args(required + ["--dtype", "float64"])
        with pytest.raises(UserError, match="--dtype"):
            cls(**{**vars(parser.parse_args(required)), "dtype": "float64"})
    assert resolve_dtype("auto", "cpu") is torch.float32 and resolve_dtype("bf16") is torch.bfloat16


def test_dtype_is_recorded_in_the_run_record(tmp_path):
    from runs.eval_config import EvalConfig
    from runs.eval_run import run_evaluation
    from toyworld.world import generate_toyworld

    generate_toyworld(str(tmp_path / "data" / "toyworld"), n_train=2, n_eval=2, n_pretrain_scenes=2)
    outcome = run_evaluation(EvalConfig(sequential_edit_n=2, editor_name="none", model_name="tiny-blip2",
                                        data_name="TOY", data_dir=str(tmp_path / "data"), dtype="bfloat16",
                                        results_dir=str(tmp_path / "res"), show_progress=False, exact_match=False,
                                        plot=False, tensorboard=False))
    with open(os.path.join(outcome.folder, "mean_results.json")) as f:
        run = json.load(f)["run"]
    assert run["dtype"] == "bfloat16" and run["config"]["dtype"] == "bfloat16"

