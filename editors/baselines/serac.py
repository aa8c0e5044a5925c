"""SERAC-VL (spec §7 "SERAC-VL", W-19 fixed): a scope classifier and a counterfactual model.

Edit memory: per edit, its VLLM input embeddings (image + prompt + target, the real positions)
and its scope key. Scope key / query representation: the VLLM input embeddings of the real
positions (a query: only up to its last prompt token; at most the last `max_scope_positions`)
-> ResBlock(D -> w) -> LayerNorm -> / `embed_scale` -> the aux encoder (BERT) -> [mean, max, min]
pooling ([3w]). Score(query, edit) = <q, e> / sqrt(3w).

Counterfactual model: the aux decoder (OPT) on [edit embeds ; the query row's embeds], both
projected by ResBlock(D -> w_c); its last hidden state at the query's positions through
ResBlock(w_c -> D) replaces the last decoder layer's output of that row, so the backbone's final
norm and LM head make the logits (a layer edit on the last layer; other rows, text-only ones
included, go through untouched). A row is in scope when its best score is >= `scope_threshold`
(the authors' 10); it then uses its best edit.

Generation: at "prefill" the decision and the counterfactual output are made per row and kept in
the call's memo; at each "decode" step the new token of an in-scope row is the argmax of its own
previous replaced output (what `generate` picks), appended to its counterfactual sequence, which
is run again. Fixed from the authors (W-19): the memory has the representations' width (3w).
Not batched (as the authors): `edit` takes one request at a time, in order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from editors.auxiliary import REAL_AUX, TINY_AUX, ResBlock, load_aux, masked_pool
from editors.base import TrainableEditor
from editors.baselines.saved import identity, load_state, request_entries, requests_from, save_state
from utils.errors import UserError
from utils.records import EditRecord, Sample
from .trained_common import pack, real_rows



@dataclass
class SERACConfig:
    """SERAC-VL's hyper-parameters (the authors' values as defaults)."""

    scope_model: str = "bert-base-cased"
    """Aux encoder of the scope classifier (`tiny-bert` on the tiny backbones)."""
    counterfactual_model: str = "opt-125m"
    """Aux decoder of the counterfactual model (`tiny-opt` on the tiny backbones)."""
    scope_threshold: float = 10.0
    """A query is in an edit's scope when its best score is >= this (the authors hard-code 10)."""
    no_edit_logit: float = 10.0
    """The fixed "no edit" column of the scope losses (the authors': 10)."""
    max_scope_positions: int = 512
    """The scope classifier reads the last this many input positions."""
    embed_scale: float = 32.0
    """Projected input embeddings are layer-normed and divided by this before the scope encoder."""
    lr: float = 1e-4
    """Adam learning rate."""
    rel_lambda: float = 1.0
    gen_lambda: float = 1.0
    loc_lambda: float = 1.0
    scope_lambda: float = 1.0
    seed: int = 0
    """Seeds the randomly initialised modules (and the tiny aux stand-ins)."""

    def __post_init__(self):
        for key in ("scope_model", "counterfactual_model"):
            if getattr(self, key) not in REAL_AUX and getattr(self, key) not in TINY_AUX:
                raise UserError(f"SERAC config {key}={getattr(self, key)!r} is not an auxiliary model; valid: "
                                f"{', '.join(sorted(REAL_AUX) + list(TINY_AUX))}")
        for key in ("scope_threshold", "no_edit_logit"):
            if not math.isfinite(getattr(self, key)):
                raise UserError(f"SERAC config {key} must be a finite number, got {getattr(self, key)}")
        for key in ("max_scope_positions",):
            if getattr(self, key) < 1:
                raise UserError(f"SERAC config {key} must be >= 1, got {getattr(self, key)}")
        for key in ("embed_scale", "lr"):
            if not getattr(self, key) > 0:
                raise UserError(f"SERAC config {key} must be > 0, got {getattr(self, key)}")
        for key in ("rel_lambda", "gen_lambda", "loc_lambda", "scope_lambda"):
            if getattr(self, key) < 0:
                raise UserError(f"SERAC config {key} must be >= 0, got {getattr(self, key)}")


class SERAC(TrainableEditor):
    name = "serac_vl"
    config_class = SERACConfig
    supports_batch_edit = False  # the authors edit one request at a time
    saves_edits = True           # the edit memory (embeddings and scope keys)

    def __init__(self, vllm, config: SERACConfig):
        super().__init__(vllm, config)
        d, device = vllm.hidden_size, vllm.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.scope_aux = load_aux(config.scope_model, device, seed=config.seed)
            self.cf_aux = load_aux(config.counterfactual_model, device, seed=config.seed + 1)
            ws, wc = self.scope_aux.width, self.cf_aux.width
            self.scope_proj = ResBlock(d, ws).to(device)
            self.scope_norm = nn.LayerNorm(ws).to(device)
            self.cf_in = ResBlock(d, wc).to(device)
            self.cf_out = ResBlock(wc, d).to(device)
        self.key_dim = 3 * ws  # [mean, max, min] (W-19: the memory has this width, not ws)
        self.keys = torch.zeros(0, self.key_dim, device=device)  # [m, 3w] scope keys of the edits
        self.edit_embeds: list[torch.Tensor] = []                  # per edit [n_e, D], backbone dtype
        self.requests: list[Sample] = []
        self.is_training = False
        self.set_train(False)
        self.hook_layer(vllm.num_layers - 1, self._replace_hidden)

    # ---- Editor API ----------------------------------------------------------------------------
    @property
    def num_edits(self) -> int:
        return len(self.edit_embeds)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"scope_proj": self.scope_proj, "scope_norm": self.scope_norm, "scope_model": self.scope_aux.model,
                "cf_in": self.cf_in, "cf_model": self.cf_aux.model, "cf_out": self.cf_out}

    def set_train(self, mode: bool) -> None:
        super().set_train(mode)
        self.is_training = mode

    def restore(self) -> None:
        self.keys = self.keys[:0]
        self.edit_embeds, self.requests = [], []

    @torch.no_grad()
    def edit(self, requests: list[Sample]) -> None:
        """Store each request's input embeddings and scope key (one request at a time, in order)."""
        for r in requests:
            with self.vllm.unedited():
                batch = self.vllm.prepare([r.prompt], [r.image], [r.target])
            row = real_rows(batch.inputs_embeds, batch.attention_mask)
            self.keys = torch.cat([self.keys, self.scope_reps(row)])
            self.edit_embeds.append(row[0])
            self.requests.append(r)

    def save_edits(self, directory: str) -> None:
        tensors = {"keys": self.keys} | {f"embeds.{i}": e for i, e in enumerate(self.edit_embeds)}
        save_state(directory, tensors, identity(self) | {"num_edits": self.num_edits,
                                                            "requests": request_entries(self.requests)})

    def load_edits(self, directory: str) -> None:
        tensors, manifest = load_state(directory, identity(self), self.vllm.device)
        if tensors["keys"].shape[-1] != self.key_dim:
            raise UserError(f"saved scope keys in {directory} have width {tensors['keys'].shape[-1]}, "
                            f"this SERAC config gives {self.key_dim}")
        n = int(manifest["num_edits"])
        self.keys = tensors["keys"]
        self.edit_embeds = [tensors[f"embeds.{i}"] for i in range(n)]
        self.requests = requests_from(manifest["requests"])

    # ---- the two models ----------------------------------------------------------------------------
    def scope_reps(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Per row input embeddings [n_i, D] -> scope representations [b, 3w]."""
        dtype = self.scope_norm.weight.dtype
        packed, mask = pack([r[-self.config.max_scope_positions:].to(dtype) for r in rows])  # [b, l, D]
        x = self.scope_norm(self.scope_proj(packed)) / self.config.embed_scale  # [b, l, w]
        hidden = self.scope_aux.model(inputs_embeds=x, attention_mask=mask).last_hidden_state  # [b, l, w]
        return masked_pool(hidden, mask)  # [b, 3w]

    def scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[q, 3w] x [m, 3w] -> [q, m] dot products / sqrt(3w)."""
        return queries @ keys.T / math.sqrt(self.key_dim)

    def counterfactual(self, edits: list[torch.Tensor], queries: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per row [edit embeds ; query embeds] through the counterfactual model -> its output [n_q, D] at
        the query positions (module dtype)."""
        dtype = self.cf_out.proj.weight.dtype
        seqs = [torch.cat([e, q]).to(dtype) for e, q in zip(edits, queries)]
        packed, mask = pack(seqs)  # [b, l, D]
        hidden = self.cf_aux.model(inputs_embeds=self.cf_in(packed), attention_mask=mask).last_hidden_state
        out = self.cf_out(hidden)  # [b, l, D]
        return [out[i, len(e):len(e) + len(q)] for i, (e, q) in enumerate(zip(edits, queries))]

    def query_rows(self, batch) -> list[torch.Tensor]:
        """Per row the input embeddings the scope classifier reads: real positions up to the query's end."""
        positions = torch.arange(batch.length, device=batch.attention_mask.device)
        mask = batch.attention_mask.bool() & (positions[None] < batch.query_spans[:, 1:2])
        return real_rows(batch.inputs_embeds, mask)

    # ---- inference -----------------------------------------------------------------------------------
    def _route(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(in-scope rows [k], their best edit [k])."""
        scores = self.scores(self.scope_reps(self.query_rows(batch)), self.keys)  # [b, m]
        best, which = scores.max(dim=1)
        rows = (best >= self.config.scope_threshold).nonzero().flatten()
        return rows, which[rows]

    def _replace_hidden(self, hidden: torch.Tensor, call) -> torch.Tensor | None:
        """The last layer's output [b, l, D] -> the counterfactual model's output on in-scope rows."""
        if self.is_training or not self.edit_embeds:
            return None
        memo = call.memo
        if call.phase == "decode":
            return self._decode_step(hidden, memo) if memo.get("rows") else None
        rows, which = self._route(call.batch)
        memo["rows"] = rows.tolist()
        if len(rows) == 0:
            return None
        batch = call.batch
        queries = real_rows(batch.inputs_embeds[rows], batch.attention_mask[rows])
        edits = [self.edit_embeds[j] for j in which.tolist()]
        outs = self.counterfactual(edits, queries)
        edited = hidden.clone()
        for r, out in zip(rows.tolist(), outs):
            edited[r, batch.attention_mask[r].bool()] = out.to(hidden.dtype)
        memo["seqs"] = [(e, q) for e, q in zip(edits, queries)]
        memo["last"] = [out[-1:].to(hidden.dtype) for out in outs]
        return edited

    def _decode_step(self, hidden: torch.Tensor, memo: dict) -> torch.Tensor:
        """One generated token: extend each in-scope row's counterfactual sequence by the token its own
        previous output chose (greedy, as `generate`), rerun, and replace that row's output."""
        stack = self.vllm.stack
        edited = hidden.clone()  # [b, 1, D]
        for i, r in enumerate(memo["rows"]):
            edit, query = memo["seqs"][i]
            one = torch.ones(1, 1, dtype=torch.long, device=hidden.device)
            final = stack.run_from(memo["last"][i][None], one, one - 1, self.vllm.num_layers)  # [1, 1, D]
            token = stack.lm_head(final[:, -1]).argmax(-1)  # [1]
            query = torch.cat([query, stack.embed_tokens(token).to(query.dtype)])
            out = self.counterfactual([edit], [query])[0][-1:]  # [1, D]
            memo["seqs"][i], memo["last"][i] = (edit, query), out.to(hidden.dtype)
            edited[r, -1] = memo["last"][i][0]
        return edited

    # ---- training (see serac_training.py) ----------------------------------------------------------
    def make_optimizer(self):
        params = [p for m in self.trainable_modules().values() for p in m.parameters()]
        return torch.optim.Adam(params, lr=self.config.lr), None

    def training_batch(self, records: list[EditRecord], rng: np.random.Generator):
        from .serac_training import prepare_batch

        return prepare_batch(self, records, rng)

    def train_step(self, batch) -> dict[str, float]:
        from .serac_training import train_step

        return train_step(self, batch)
