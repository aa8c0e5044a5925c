"""RECIPE-VL (spec §7 "RECIPE-VL", W-19 fixed): retrieved continuous prompts.

Knowledge representation model: the aux text encoder (RoBERTa) with [pooler, mean, max, min]
features ([4w]) through a knowledge head (for edits, "prompt target") or a query head (for
queries, the prompt), each `Linear(4w -> C)` plus a residual `ReLU(Linear(C -> C))`, C =
`rep_dim`. A learned prototype: `prototype_tokens` embeddings through the encoder and the
knowledge head. Similarity = dot product / sqrt(C).

Prompt transformer: a knowledge representation [C] -> `prompt_tokens` continuous tokens [3, D].

Edit: encode `prompt target`, add it and its prompt tokens to the pool (batched: a chunk at once
is the same as one by one, each edit is independent). Inference: `prepare` asks `_prefixes`
(the backbone's input-prefix extension, `VLLM.add_input_prefix`): a row whose top-1 edit beats
the prototype gets that edit's prompt tokens before its input embeddings; its image is KEPT (the
authors drop the image at inference, W-19). Prompt tokens shift the sequence; the batch's spans
and labels move with it, so scoring reads the right positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from editors.auxiliary import REAL_AUX, TINY_AUX, encode_texts, load_aux, masked_pool
from editors.base import TrainableEditor
from editors.baselines.saved import identity, load_state, request_entries, requests_from, save_state
from utils.errors import UserError
from utils.records import EditRecord, Sample



def knowledge_text(prompt: str, target: str) -> str:
    """`prompt target` joined by one space unless either side has whitespace there (as `prepare`)."""
    sep = " " if prompt and target and not prompt[-1].isspace() and not target[0].isspace() else ""
    return prompt + sep + target


@dataclass
class RECIPEConfig:
    """RECIPE-VL's hyper-parameters (the authors' values as defaults)."""

    knowledge_model: str = "roberta-base"
    """Aux encoder of the knowledge representation model (`tiny-roberta` on the tiny backbones)."""
    rep_dim: int = 4096
    """Width C of the knowledge / query representations (the paper: 4096)."""
    prompt_tokens: int = 3
    """Continuous prompt tokens per edit."""
    prototype_tokens: int = 10
    """Learned tokens whose encoding is the prototype ("no edit applies")."""
    hinge_scale: float = 1.2
    """Contrastive hinge: a prototype term counts only while its probability is below this times the
    runner-up's."""
    query_knowledge_t: float = 1.0
    """Temperature (multiplier) of the query-to-knowledge softmax."""
    query_prototype_t: float = 1.0
    """Temperature (multiplier) of the query-to-prototype softmaxes."""
    lr: float = 1e-5
    """Adam learning rate (representation model and prompt transformer)."""
    rel_lambda: float = 1.0
    gen_lambda: float = 1.0
    loc_lambda: float = 1.0
    contrastive_lambda: float = 1.0
    seed: int = 0
    """Seeds the randomly initialised modules (and the tiny aux stand-in)."""

    def __post_init__(self):
        if self.knowledge_model not in REAL_AUX and self.knowledge_model not in TINY_AUX:
            raise UserError(f"RECIPE config knowledge_model={self.knowledge_model!r} is not an auxiliary model; "
                            f"valid: {', '.join(sorted(REAL_AUX) + list(TINY_AUX))}")
        for key in ("rep_dim", "prompt_tokens", "prototype_tokens"):
            if getattr(self, key) < 1:
                raise UserError(f"RECIPE config {key} must be >= 1, got {getattr(self, key)}")
        for key in ("hinge_scale", "query_knowledge_t", "query_prototype_t", "lr"):
            if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
                raise UserError(f"RECIPE config {key} must be a positive number, got {getattr(self, key)}")
        for key in ("rel_lambda", "gen_lambda", "loc_lambda", "contrastive_lambda"):
            if getattr(self, key) < 0:
                raise UserError(f"RECIPE config {key} must be >= 0, got {getattr(self, key)}")


class KnowledgeRepresentation(nn.Module):
    """Texts -> knowledge or query representations [n, C]; the prototype [1, C]."""

    def __init__(self, aux, rep_dim: int, prototype_tokens: int):
        super().__init__()
        self.aux = aux
        self.encoder = aux.model
        w = aux.width
        self.knowledge_in, self.query_in = nn.Linear(4 * w, rep_dim), nn.Linear(4 * w, rep_dim)
        self.knowledge_res = nn.Sequential(nn.Linear(rep_dim, rep_dim), nn.ReLU())
        self.query_res = nn.Sequential(nn.Linear(rep_dim, rep_dim), nn.ReLU())
        self.prototype = nn.Parameter((torch.rand(1, prototype_tokens, w) - 0.5) * 0.1)  # [1, P, w]

    def _head(self, hidden, mask, pooler, kind: str) -> torch.Tensor:
        pooled = masked_pool(hidden, mask)  # [n, 3w] mean, max, min
        if pooler is None:
            pooler = hidden[:, 0]
        x = torch.cat([pooler, pooled], -1)  # [n, 4w]
        lin, res = (self.knowledge_in, self.knowledge_res) if kind == "k" else (self.query_in, self.query_res)
        x = lin(x)
        return res(x) + x  # [n, C]

    def forward(self, texts: list[str], kind: str) -> torch.Tensor:
        """kind "k" (edits) or "q" (queries)."""
        hidden, mask, pooler = encode_texts(self.aux, texts)
        return self._head(hidden, mask, pooler, kind)

    def prototype_rep(self) -> torch.Tensor:
        """The prototype tokens through the encoder layers (no position embeddings) and the knowledge head."""
        hidden = self.encoder.encoder(self.prototype).last_hidden_state  # [1, P, w]
        pooler = self.encoder.pooler(hidden) if getattr(self.encoder, "pooler", None) is not None else None
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return self._head(hidden, mask, pooler, "k")  # [1, C]


class PromptTransformer(nn.Module):
    """A knowledge representation [n, C] -> continuous prompt tokens [n, T, D]."""

    def __init__(self, rep_dim: int, d: int, tokens: int, token_std: float):
        super().__init__()
        self.res = nn.Sequential(nn.Linear(rep_dim, rep_dim), nn.ReLU())
        self.out = nn.Linear(rep_dim, tokens * d)
        # start at the scale of the backbone's token embeddings (std `token_std`), not Linear's default
        # (which on a narrow backbone gives prompt tokens far larger than any word's embedding)
        nn.init.normal_(self.out.weight, std=token_std / math.sqrt(rep_dim))
        nn.init.zeros_(self.out.bias)
        self.tokens = tokens

    def forward(self, reps: torch.Tensor) -> torch.Tensor:
        x = self.res(reps) + reps
        return self.out(x).reshape(len(reps), self.tokens, -1)


class RECIPE(TrainableEditor):
    name = "recipe_vl"
    config_class = RECIPEConfig
    supports_batch_edit = True  # each edit's representation and prompt are independent of the others
    saves_edits = True          # the knowledge pool (representations and prompts)

    def __init__(self, vllm, config: RECIPEConfig):
        super().__init__(vllm, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            aux = load_aux(config.knowledge_model, vllm.device, seed=config.seed)
            self.krm = KnowledgeRepresentation(aux, config.rep_dim, config.prototype_tokens).to(vllm.device)
            token_std = float(vllm.stack.inner.get_input_embeddings().weight.float().std())
            self.prompt_transformer = PromptTransformer(config.rep_dim, vllm.hidden_size, config.prompt_tokens,
                                                        token_std).to(vllm.device)
        self.keys = torch.zeros(0, config.rep_dim, device=vllm.device)  # [m, C]
        self.prompts = torch.zeros(0, config.prompt_tokens, vllm.hidden_size, device=vllm.device)  # [m, T, D]
        self.requests: list[Sample] = []
        self.is_training = False
        self.set_train(False)
        self._prefix = vllm.add_input_prefix(self._prefixes)

    # ---- Editor API ----------------------------------------------------------------------------
    @property
    def num_edits(self) -> int:
        return len(self.requests)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"krm": self.krm, "prompt_transformer": self.prompt_transformer}

    def set_train(self, mode: bool) -> None:
        super().set_train(mode)
        self.is_training = mode

    def remove(self) -> None:
        super().remove()
        self._prefix.remove()

    def restore(self) -> None:
        self.keys, self.prompts, self.requests = self.keys[:0], self.prompts[:0], []

    @torch.no_grad()
    def edit(self, requests: list[Sample]) -> None:
        """Add each request's knowledge representation and prompt tokens to the pool."""
        if not requests:
            return
        reps = self.krm([knowledge_text(r.prompt, r.target) for r in requests], "k")  # [n, C]
        self.keys = torch.cat([self.keys, reps])
        self.prompts = torch.cat([self.prompts, self.prompt_transformer(reps)])
        self.requests.extend(requests)

    def save_edits(self, directory: str) -> None:
        save_state(directory, {"keys": self.keys, "prompts": self.prompts},
                   identity(self) | {"requests": request_entries(self.requests)})

    def load_edits(self, directory: str) -> None:
        tensors, manifest = load_state(directory, identity(self), self.vllm.device)
        if tuple(tensors["prompts"].shape[1:]) != tuple(self.prompts.shape[1:]):
            raise UserError(f"saved prompts in {directory} have shape {tuple(tensors['prompts'].shape[1:])}, "
                            f"this RECIPE config gives {tuple(self.prompts.shape[1:])}")
        self.keys, self.prompts = tensors["keys"], tensors["prompts"]
        self.requests = requests_from(manifest["requests"])

    # ---- retrieval -----------------------------------------------------------------------------------
    def similarity(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[n, C] x [m, C] -> [n, m] dot products / sqrt(C)."""
        return queries @ keys.T / math.sqrt(self.config.rep_dim)

    @torch.no_grad()
    def retrieve(self, prompts: list[str]) -> list[int | None]:
        """Per query prompt, the index of its top-1 edit if that beats the prototype, else None."""
        if not self.requests:
            return [None] * len(prompts)
        queries = self.krm(list(prompts), "q")  # [n, C]
        sims = self.similarity(queries, self.keys)  # [n, m]
        prototype = self.similarity(queries, self.krm.prototype_rep())[:, 0]  # [n]
        best, which = sims.max(dim=1)
        return [int(j) if b > p else None for b, p, j in zip(best.tolist(), prototype.tolist(), which.tolist())]

    def _prefixes(self, prompts: list[str], images) -> list[torch.Tensor | None]:
        """The input-prefix function: the retrieved edit's prompt tokens [T, D] per row (or None)."""
        if self.is_training or not self.requests:
            return [None] * len(prompts)
        return [None if j is None else self.prompts[j] for j in self.retrieve(prompts)]

    # ---- training (see recipe_training.py) ----------------------------------------------------------
    def make_optimizer(self):
        params = [p for m in self.trainable_modules().values() for p in m.parameters()]
        return torch.optim.Adam(params, lr=self.config.lr), None

    def training_batch(self, records: list[EditRecord], rng: np.random.Generator):
        from .recipe_training import prepare_batch

        return prepare_batch(self, records, rng)

    def train_step(self, batch) -> dict[str, float]:
        from .recipe_training import train_step

        return train_step(self, batch)
