"""MiniGPT-4 from the original release files (spec §3.8): EVA ViT-g, BLIP-2 Q-Former, projection.

The tiny MiniGPT-4 is written out in the layout of the original checkpoints. The original key
names are spelled out here by hand, independently of the renaming code in
`editors/vllms/minigpt4_release.py`, so that a wrong rule there cannot cancel itself out.
"""
from __future__ import annotations

import os

import pytest
import torch
import yaml

from conftest import make_image
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
