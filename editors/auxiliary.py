"""The baselines' auxiliary models: BERT, OPT-125m, RoBERTa and the MPNet sentence encoder.

SERAC uses `bert-base-cased` (scope classifier) and `opt-125m` (counterfactual model), RECIPE
`roberta-base` (knowledge representations), LTE `multi-qa-mpnet-base-dot-v1` (retriever). An
editor config names the one it uses; real names load from a local folder found like a backbone's
(`--aux_model_path NAME=FOLDER`, then `LIVEEDIT_<NAME>_PATH`, then configs/model_paths.yaml; see
`editors/vllms/paths.py`), with transformers' Auto classes and `local_files_only=True` (never a
download). The tiny stand-ins `tiny-bert`, `tiny-opt`, `tiny-roberta`, `tiny-mpnet` are random
models of the same config classes with small widths and a byte-level BPE tokenizer trained on the
spot on the toy world's text (the same seed gives the same weights); they load from a folder
instead when one is given for their name the same three ways (a trained stand-in saved with
`save_aux`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from utils.errors import UserError

# real name -> transformers model_type its config.json must declare
REAL_AUX = {"bert-base-cased": "bert", "opt-125m": "opt", "roberta-base": "roberta",
            "multi-qa-mpnet-base-dot-v1": "mpnet"}
TINY_AUX = ("tiny-bert", "tiny-opt", "tiny-roberta", "tiny-mpnet")
TINY_WIDTH, TINY_LAYERS, TINY_HEADS = 64, 2, 4


@dataclass
class AuxModel:
    """An auxiliary transformer: its model (the bare encoder / decoder, no head), tokenizer and width."""

    name: str
    model: nn.Module
    tokenizer: object | None
    pooling: str = "mean"  # a sentence encoder's pooling, from its folder's 1_Pooling/config.json if any

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)


def aux_names() -> list[str]:
    return sorted(REAL_AUX) + list(TINY_AUX)


def _tiny_config(name: str, vocab: int, pad_id: int):
    from transformers import BertConfig, MPNetConfig, OPTConfig, RobertaConfig

    common = dict(vocab_size=vocab, hidden_size=TINY_WIDTH, num_hidden_layers=TINY_LAYERS,
                  num_attention_heads=TINY_HEADS, pad_token_id=pad_id)
    if name == "tiny-bert":
        return BertConfig(intermediate_size=2 * TINY_WIDTH, max_position_embeddings=512, **common)
    if name == "tiny-roberta":
        return RobertaConfig(intermediate_size=2 * TINY_WIDTH, max_position_embeddings=514, **common)
    if name == "tiny-mpnet":
        return MPNetConfig(intermediate_size=2 * TINY_WIDTH, max_position_embeddings=514, **common)
    return OPTConfig(ffn_dim=2 * TINY_WIDTH, max_position_embeddings=2048, word_embed_proj_dim=TINY_WIDTH,
                     **common)


def build_tiny_aux(name: str, seed: int = 0, vocab_size: int = 1024) -> AuxModel:
    """A tiny random stand-in `name` (one of TINY_AUX): same transformers classes, small widths."""
    from transformers import AutoModel

    from editors.vllms.tokenizer import train_tokenizer

    if name not in TINY_AUX:
        raise UserError(f"unknown tiny auxiliary model {name!r}; valid: {', '.join(TINY_AUX)}")
    tok = train_tokenizer(vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(_tiny_config(name, len(tok), tok.pad_token_id))
    return AuxModel(name, model.eval(), tok)


def save_aux(aux: AuxModel, directory: str) -> None:
    """The real folder layout: `save_pretrained` of the model and its tokenizer (what `load_aux` reads)."""
    os.makedirs(directory, exist_ok=True)
    aux.model.save_pretrained(directory)
    if aux.tokenizer is not None:
        aux.tokenizer.save_pretrained(directory)


def _folder_pooling(folder: str, default: str) -> str:
    """A sentence-transformers folder says its pooling in 1_Pooling/config.json (cls or mean)."""
    path = os.path.join(folder, "1_Pooling", "config.json")
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        cfg = json.load(f)
    return "cls" if cfg.get("pooling_mode_cls_token") else "mean"


def load_aux_folder(name: str, folder: str, pooling: str = "mean") -> AuxModel:
    """Model (+ tokenizer if the folder has one) from a local folder, Auto classes, no download."""
    from transformers import AutoModel, AutoTokenizer

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{folder} has no config.json: not a Hugging Face folder for {name}")
    with open(config_path) as f:
        found = json.load(f).get("model_type")
    expected = REAL_AUX.get(name) or {"tiny-bert": "bert", "tiny-opt": "opt", "tiny-roberta": "roberta",
                                      "tiny-mpnet": "mpnet"}[name]
    if found != expected:
        raise UserError(f"{folder} holds a {found!r} model, but {name} needs model_type {expected!r}")
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    has_tok = any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.txt", "vocab.json"))
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True) if has_tok else None
    return AuxModel(name, model.eval(), tok, _folder_pooling(folder, pooling))


def load_aux(name: str, device="cpu", seed: int = 0) -> AuxModel:
    """Auxiliary model `name` on `device`: a real one from its local folder, a tiny one built (or from
    a folder when one is given for it)."""
    from editors.vllms.paths import aux_flag_path, env_var, resolve_aux_path

    if name not in REAL_AUX and name not in TINY_AUX:
        raise UserError(f"unknown auxiliary model {name!r}; valid names: {', '.join(aux_names())}")
    if name in TINY_AUX and not (aux_flag_path(name) or os.environ.get(env_var(name))):
        aux = build_tiny_aux(name, seed)
    else:
        aux = load_aux_folder(name, resolve_aux_path(name))
    aux.model.to(device)
    return aux


# ---- shared pieces of the aux-model editors -------------------------------------------------------

class ResBlock(nn.Module):
    """x [.., in] -> h + W2 GELU(W1 h), h = W0 x [.., out]: the projection between widths SERAC uses."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.up = nn.Linear(d_out, d_out)
        self.down = nn.Linear(d_out, d_out)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return h + self.down(nn.functional.gelu(self.up(h)))


def masked_pool(hidden: torch.Tensor, mask: torch.Tensor, kinds=("mean", "max", "min")) -> torch.Tensor:
    """hidden [b, l, w], mask [b, l] -> [b, len(kinds) * w], pooled over the masked positions."""
    m = mask.bool()[..., None]  # [b, l, 1]
    out = []
    for kind in kinds:
        if kind == "mean":
            out.append((hidden * m).sum(1) / m.sum(1).clamp(min=1))
        elif kind == "max":
            out.append(hidden.masked_fill(~m, torch.finfo(hidden.dtype).min).amax(1))
        elif kind == "min":
            out.append(hidden.masked_fill(~m, torch.finfo(hidden.dtype).max).amin(1))
        elif kind == "cls":
            out.append(hidden[:, 0])
        else:
            raise ValueError(f"unknown pooling {kind!r}")
    return torch.cat(out, dim=-1)


def encode_texts(aux: AuxModel, texts: list[str], max_length: int = 512):
    """Tokenise and run a text encoder: -> (last hidden [b, l, w], mask [b, l], pooler or None)."""
    if aux.tokenizer is None:
        raise UserError(f"auxiliary model {aux.name} has no tokenizer in its folder; it cannot encode text")
    device = next(aux.model.parameters()).device
    enc = aux.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    out = aux.model(**enc)
    return out.last_hidden_state, enc["attention_mask"], getattr(out, "pooler_output", None)
