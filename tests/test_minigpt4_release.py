"""MiniGPT-4 from the original release files (spec §3.8): EVA ViT-g, BLIP-2 Q-Former, projection.

The tiny MiniGPT-4 is written out in the layout of the original checkpoints. The original key
names are spelled out here by hand, independently of the renaming code in
`editors/vllms/minigpt4_release.py`, so that a wrong rule there cannot cancel itself out.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, make_image
from editors.vllms import build_tiny, load_vllm
from utils.errors import UserError

PROMPTS = ["what color is the shape? The answer is:", "nq question: what is the capital of x?"]
TARGETS = ["red", "pomox"]
FILES = {"vit_path": "eva_vit_g.pth", "q_former_model": "blip2_pretrained.pth", "ckpt": "pretrained_minigpt4.pth"}


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone()


def eva_keys(visual_encoder) -> dict[str, torch.Tensor]:
    """The EVA ViT-g checkpoint keys of the tiny vision tower (q and v bias apart, no k bias)."""
    emb = visual_encoder.embeddings
    d = visual_encoder.config.hidden_size
    out = {"cls_token": _t(emb.class_embedding), "pos_embed": _t(emb.position_embedding),
           "patch_embed.proj.weight": _t(emb.patch_embedding.weight),
           "patch_embed.proj.bias": _t(emb.patch_embedding.bias)}
    for i, layer in enumerate(visual_encoder.encoder.layers):
        p = f"blocks.{i}."
        out[p + "norm1.weight"] = _t(layer.layer_norm1.weight)
        out[p + "norm1.bias"] = _t(layer.layer_norm1.bias)
        out[p + "norm2.weight"] = _t(layer.layer_norm2.weight)
        out[p + "norm2.bias"] = _t(layer.layer_norm2.bias)
        out[p + "attn.qkv.weight"] = _t(layer.self_attn.qkv.weight)
        out[p + "attn.q_bias"] = _t(layer.self_attn.qkv.bias[:d])
        out[p + "attn.v_bias"] = _t(layer.self_attn.qkv.bias[2 * d:])
        out[p + "attn.proj.weight"] = _t(layer.self_attn.projection.weight)
        out[p + "attn.proj.bias"] = _t(layer.self_attn.projection.bias)
        for fc in ("fc1", "fc2"):
            out[p + f"mlp.{fc}.weight"] = _t(getattr(layer.mlp, fc).weight)
            out[p + f"mlp.{fc}.bias"] = _t(getattr(layer.mlp, fc).bias)
    return out


def _linear(out: dict, prefix: str, module) -> None:
    out[prefix + ".weight"] = _t(module.weight)
    out[prefix + ".bias"] = _t(module.bias)


def blip2_keys(model) -> dict[str, torch.Tensor]:
    """A BLIP-2 stage-1 checkpoint: ViT, ln_vision, query tokens, the LAVIS BERT Q-Former, heads."""
    out = {"visual_encoder." + k: v for k, v in eva_keys(model.visual_encoder).items()}
    _linear(out, "ln_vision", model.visual_encoder.post_layernorm)
    out["query_tokens"] = _t(model.query_tokens)
    q = model.Qformer
    _linear(out, "Qformer.bert.embeddings.LayerNorm", q.layernorm)
    for i, layer in enumerate(q.encoder.layer):
        p = f"Qformer.bert.encoder.layer.{i}."
        for part in ("attention", "crossattention"):
            if not hasattr(layer, part):
                continue
            block = getattr(layer, part)
            for proj in ("query", "key", "value"):
                _linear(out, p + f"{part}.self.{proj}", getattr(block.attention, proj))
            _linear(out, p + f"{part}.output.dense", block.output.dense)
            _linear(out, p + f"{part}.output.LayerNorm", block.output.LayerNorm)
        _linear(out, p + "intermediate_query.dense", layer.intermediate_query.dense)
        _linear(out, p + "output_query.dense", layer.output_query.dense)
        _linear(out, p + "output_query.LayerNorm", layer.output_query.LayerNorm)
    # Parts of BLIP-2 that MiniGPT-4 removes; the loader must drop them.
    h, v = q.config.hidden_size, q.config.vocab_size
    out.update({"Qformer.cls.predictions.bias": torch.zeros(v),
                "Qformer.bert.embeddings.word_embeddings.weight": torch.randn(v, h),
                "Qformer.bert.embeddings.position_ids": torch.arange(64).unsqueeze(0),
                "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.randn(2 * h, h),
                "Qformer.bert.encoder.layer.0.output.dense.weight": torch.randn(h, 2 * h),
                "vision_proj.weight": torch.randn(16, h), "temp": torch.tensor(0.07)})
    return out


def write_release(vllm, folder: str) -> None:
    """The original MiniGPT-4 release layout of `vllm` (a tiny MiniGPT-4) in `folder`."""
    model = vllm.model
    vc, qc = model.visual_encoder.config, model.Qformer.config
    model_config = {
        "llama_model": "vicuna", **FILES, "num_query_token": model.query_tokens.shape[1],
        "vision_config": {k: getattr(vc, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads", "image_size", "patch_size")},
        # no encoder_hidden_size: the loader takes it from the vision tower
        "qformer_config": {k: getattr(qc, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                       "intermediate_size", "cross_attention_frequency")},
    }
    with open(os.path.join(folder, "model_config.yaml"), "w") as f:
        yaml.safe_dump(model_config, f)
    proc = vllm.image_processor
    with open(os.path.join(folder, "processor_config.yaml"), "w") as f:
        yaml.safe_dump({"image_size": proc.size["height"], "mean": list(proc.image_mean),
                        "std": list(proc.image_std)}, f)
    model.llama_model.save_pretrained(os.path.join(folder, "vicuna"))
    vllm.tokenizer.save_pretrained(os.path.join(folder, "vicuna"))
    torch.save(eva_keys(model.visual_encoder), os.path.join(folder, FILES["vit_path"]))
    torch.save({"model": blip2_keys(model)}, os.path.join(folder, FILES["q_former_model"]))
    torch.save({"model": {"llama_proj.weight": _t(model.llama_proj.weight),
                          "llama_proj.bias": _t(model.llama_proj.bias)}},
               os.path.join(folder, FILES["ckpt"]))


@pytest.fixture(scope="module")
def source():
    """A fresh tiny MiniGPT-4 whose EVA k-bias slices are zero (EVA has no k bias)."""
    vllm = build_tiny("tiny-minigpt4")
    d = vllm.model.visual_encoder.config.hidden_size
    with torch.no_grad():
        for layer in vllm.model.visual_encoder.encoder.layers:
            layer.self_attn.qkv.bias[d:2 * d].zero_()
    return vllm


@pytest.fixture
def release(source, tmp_path):
    write_release(source, str(tmp_path))
    return tmp_path


def _logits(vllm) -> torch.Tensor:
    return vllm(vllm.prepare(PROMPTS, [make_image(1), None], TARGETS))


@torch.no_grad()
def test_release_layout_loads_with_bit_identical_logits(source, release):
    loaded = load_vllm("minigpt4", path=str(release))  # raises UserError on any missing / unexpected key
    assert loaded.family == "minigpt4" and loaded.num_image_tokens == source.num_image_tokens
    want, got = source.model.state_dict(), loaded.model.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]
    assert loaded.model.Qformer.config.encoder_hidden_size == source.model.visual_encoder.config.hidden_size
    assert torch.equal(loaded.pixel_values([make_image(1)]), source.pixel_values([make_image(1)]))
    batch = loaded.prepare(PROMPTS, [make_image(1), None], TARGETS)
    assert batch.has_image.tolist() == [True, False]
    assert torch.equal(_logits(loaded), _logits(source))  # bit-identical, not merely close


@pytest.mark.parametrize("key", ["Qformer.bert.encoder.layer.0.attention.self.rotary.weight",
                                 "visual_encoder.blocks.0.attn.relative_position_bias_table"])
def test_unknown_qformer_checkpoint_key_is_a_user_error(release, key):
    path = release / FILES["q_former_model"]
    state = torch.load(path, weights_only=True)
    state["model"][key] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_vllm("minigpt4", path=str(release))


def test_unknown_vit_checkpoint_key_is_a_user_error(release):
    path = release / FILES["vit_path"]
    state = torch.load(path, weights_only=True)
    state["blocks.0.attn.k_bias"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(UserError, match=r"blocks\.0\.attn\.k_bias"):
        load_vllm("minigpt4", path=str(release))


@pytest.mark.parametrize("name", [*FILES.values(), "vicuna"])
def test_missing_release_file_is_a_user_error_naming_it(release, name):
    target = release / name
    if target.is_dir():
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(UserError, match=name):
        load_vllm("minigpt4", path=str(release))


def _write_marker(path: str) -> None:
    with open(path, "w") as f:
        f.write("pickled code ran")


class Payload:
    """Unpickling this runs `_write_marker(marker)`: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return _write_marker, (self.marker,)


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(release, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("payload")
    # The payload is live: a plain unpickler (weights_only=False) does run it.
    probe = str(scratch / "probe-ran")
    torch.save({"x": Payload(probe)}, scratch / "probe.pth")
    torch.load(scratch / "probe.pth", weights_only=False)
    assert os.path.exists(probe)

    marker = str(scratch / "loader-ran")
    path = release / FILES["ckpt"]
    state = torch.load(path, weights_only=True)
    state["model"]["llama_proj.extra"] = Payload(marker)
    torch.save(state, path)
    with pytest.raises(UserError, match=FILES["ckpt"]):
        load_vllm("minigpt4", path=str(release))
    assert not os.path.exists(marker)


def test_config_that_does_not_fit_the_checkpoints_is_a_user_error(release):
    path = release / "model_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["num_query_token"] += 1  # the checkpoint's query_tokens hold one fewer
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="query_tokens"):
        load_vllm("minigpt4", path=str(release))


# ---- a real-layout Vicuna: FastChat's 2023 folder ------------------------------------------------
# `.bin` shards named by `pytorch_model.bin.index.json`, fp16 weights with the per-layer rotary
# `inv_freq` buffers, a sentencepiece `tokenizer.model` only (no tokenizer.json), a LlamaTokenizer
# `tokenizer_config.json` and `special_tokens_map.json`.

SP_VOCAB = 400


def sentencepiece_lines(n: int = 400) -> list[str]:
    """A few hundred lines of toy-world-like text to train a small sentencepiece model on."""
    import random

    from editors.vllms.tokenizer import corpus_lines

    words = sorted({w for line in corpus_lines() for w in line.split()})
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n)] + corpus_lines()


def write_sentencepiece_tokenizer(folder: str) -> None:
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentencepiece_lines()), model_writer=model, vocab_size=SP_VOCAB, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0, minloglevel=2)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    token = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True,  # noqa: E731
                       "rstrip": False, "single_word": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": token("<s>"),
                   "clean_up_tokenization_spaces": False, "eos_token": token("</s>"), "legacy": False,
                   "model_max_length": 2048, "pad_token": None, "sp_model_kwargs": {},
                   "tokenizer_class": "LlamaTokenizer", "unk_token": token("<unk>")}, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)


def write_fastchat_vicuna(llama, folder: str, n_shards: int = 2) -> None:
    """`llama`'s weights in FastChat's layout (fp16 `.bin` shards + index, with inv_freq buffers)."""
    cfg = llama.config.to_dict()
    cfg.update(architectures=["LlamaForCausalLM"], torch_dtype="float16")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    state = {k: v.half() for k, v in llama.state_dict().items()}
    head = llama.config.hidden_size // llama.config.num_attention_heads
    for i in range(llama.config.num_hidden_layers):
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head, 2).float() / head)  # [head / 2]
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    layer_of = lambda k: int(k.split(".")[2]) if k.startswith("model.layers.") else None  # noqa: E731
    n_layers, weight_map = llama.config.num_hidden_layers, {}
    for s in range(n_shards):
        name = f"pytorch_model-{s + 1:05d}-of-{n_shards:05d}.bin"
        first = s == 0
        part = {k: v.clone() for k, v in state.items()
                if (layer_of(k) is not None and layer_of(k) * n_shards // n_layers == s)
                or (layer_of(k) is None and (k.startswith("model.embed_tokens") == first))}
        if s != n_shards - 1:  # the last shard also takes norm and lm_head
            part = {k: v for k, v in part.items() if layer_of(k) is not None or k.startswith("model.embed_tokens")}
        torch.save(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    assert set(weight_map) == set(state)
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                   "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def fastchat_source(tmp_path_factory):
    """(tiny MiniGPT-4 with a sentencepiece Vicuna, its tokenizer folder): weights exact in fp16."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from editors.vllms.minigpt4 import MiniGPT4, MiniGPT4Model

    tok_dir = str(tmp_path_factory.mktemp("sp"))
    write_sentencepiece_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tiny = build_tiny("tiny-minigpt4")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                             max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                             tie_word_embeddings=False))
        model = MiniGPT4Model(tiny.model.visual_encoder.config, tiny.model.Qformer.config, llama,
                              tiny.num_image_tokens)
        model.visual_encoder.load_state_dict(tiny.model.visual_encoder.state_dict())
        model.Qformer.load_state_dict(tiny.model.Qformer.state_dict())
        torch.nn.init.normal_(model.query_tokens, std=0.02)
    d = model.visual_encoder.config.hidden_size
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
        for layer in model.visual_encoder.encoder.layers:
            layer.self_attn.qkv.bias[d:2 * d].zero_()  # EVA has no k bias
    return MiniGPT4(model, tok, tiny.image_processor), tok_dir


@pytest.fixture
def fastchat_release(fastchat_source, tmp_path):
    source, tok_dir = fastchat_source
    write_release(source, str(tmp_path))
    vicuna = tmp_path / "vicuna"
    shutil.rmtree(vicuna)
    vicuna.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tok_dir, name), vicuna / name)
    write_fastchat_vicuna(source.model.llama_model, str(vicuna))
    return tmp_path


@torch.no_grad()
def test_fastchat_vicuna_release_loads_with_the_logits_of_the_model_loaded_directly(fastchat_source,
                                                                                     fastchat_release):
    import sentencepiece

    source, _ = fastchat_source
    vicuna = fastchat_release / "vicuna"
    assert not (vicuna / "tokenizer.json").exists() and (vicuna / "pytorch_model-00002-of-00002.bin").exists()
    loaded = load_vllm("minigpt4", path=str(fastchat_release))
    # the tokenizer is the sentencepiece model itself, not an empty or substitute one
    sp = sentencepiece.SentencePieceProcessor(model_file=str(vicuna / "tokenizer.model"))
    text = "what color is the shape"
    assert loaded.tokenizer(text)["input_ids"] == [1] + sp.encode(text)
    assert len(loaded.tokenizer) == SP_VOCAB
    want, got = source.model.state_dict(), loaded.model.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    torch.testing.assert_close(_logits(loaded), _logits(source), atol=1e-5, rtol=1e-5)


def test_fastchat_vicuna_loads_in_bfloat16_as_the_cli_passes_it(fastchat_release):
    """`--dtype bfloat16` -> `load_vllm(..., dtype="bfloat16")`: every parameter, Vicuna and bridge, in bf16."""
    vllm = load_vllm("minigpt4", path=str(fastchat_release), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in vllm.model.parameters()} == {torch.bfloat16}
    assert vllm.vision_autocast_on() is False  # fp16 autocast of the vision side: on CUDA only by default
    with torch.no_grad():
        assert torch.isfinite(_logits(vllm).float()).all()


def test_missing_vicuna_tensor_is_refused_naming_it(fastchat_release):
    shard = fastchat_release / "vicuna" / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    del state["model.layers.0.mlp.down_proj.weight"]
    torch.save(state, shard)  # the index still names it: transformers would initialise it at random
    with pytest.raises(UserError, match=r"missing keys 1 \(model\.layers\.0\.mlp\.down_proj\.weight"):
        load_vllm("minigpt4", path=str(fastchat_release))


def test_missing_projection_key_is_refused_before_vicuna_is_read(fastchat_release):
    """The .pth key maps are checked against a meta-device model first: a broken Vicuna shard is not reached."""
    path = fastchat_release / FILES["ckpt"]
    state = torch.load(path, weights_only=True)
    del state["model"]["llama_proj.bias"]
    torch.save(state, path)
    shard = fastchat_release / "vicuna" / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3)  # would fail only when Vicuna is read
    torch.save(state, shard)
    with pytest.raises(UserError, match=r"missing keys 1 \(llama_proj\.bias"):
        load_vllm("minigpt4", path=str(fastchat_release))


@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_broken_vicuna_shard_is_named_before_any_weight_is_read(fastchat_release, case):
    shard = fastchat_release / "vicuna" / "pytorch_model-00002-of-00002.bin"
    if case == "missing":
        shard.unlink()
    else:
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 100)
    with pytest.raises(UserError, match=r"pytorch_model-00002-of-00002\.bin"):
        load_vllm("minigpt4", path=str(fastchat_release))


def test_sentencepiece_tokenizer_without_its_packages_is_one_clear_error(fastchat_release):
    """An install without sentencepiece (simulated: `sys.modules` entry None = not installed): a UserError."""
    code = ("import sys\n"
            "sys.modules['sentencepiece'] = None\n"
            "from editors.vllms import load_vllm\n"
            "from utils.errors import UserError\n"
            f"try:\n    load_vllm('minigpt4', path={str(fastchat_release)!r})\n"
            "except UserError as exc:\n    print('USERERROR', exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT})
    assert "USERERROR" in proc.stdout and "sentencepiece" in proc.stdout, proc.stdout + proc.stderr
    assert "requirements.txt" in proc.stdout and "Traceback" not in proc.stderr


def test_requirements_pin_the_sentencepiece_packages_that_are_installed():
    from importlib.metadata import version

    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pins = dict(line.strip().split("==") for line in f if "==" in line and not line.startswith("#"))
    for package in ("sentencepiece", "protobuf"):
        assert pins.get(package) == version(package), package


@torch.no_grad()
def test_vision_fp16_autocast_from_model_config(source, release):
    """`vision_fp16_autocast: true` in model_config.yaml: vision side in fp16, features back in the LM dtype."""
    path = release / "model_config.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "vision_fp16_autocast": True}))
    loaded = load_vllm("minigpt4", path=str(release))
    assert loaded.vision_autocast_on() and not source.vision_autocast_on()  # default off on CPU
    seen = []
    fc1 = loaded.model.visual_encoder.encoder.layers[0].mlp.fc1  # a matmul: fp16 under autocast (norms stay fp32)
    handle = fc1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    px = loaded.pixel_values([make_image(1), make_image(2)])
    features = loaded.encode_images(px)  # [2, n, d]
    handle.remove()
    assert seen == [torch.float16] and features.dtype == torch.float32
    torch.testing.assert_close(features, source.encode_images(px), atol=1e-2, rtol=1e-2)
