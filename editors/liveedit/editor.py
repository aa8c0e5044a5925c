"""LiveEdit: edit = generate an expert; inference = route experts at layer l_e (DESIGN.md §3).

Editing a request is one forward pass to layer l_e (no gradient): its vision / query / answer
representations go through f_eg (expert U, V) and f_fe (routing keys), into the repository.
At inference an edit of layer l_e (the backbone's hook mechanism) routes per sample: hard routing
keeps experts whose visual key beats the learned prototype; soft routing weights them by softmax x
sigmoid of the query similarity; the residual sum_m c_m ReLU(U_m LN(h)) V_m is added to the layer's
output. It routes at every "full" pass and at the "prefill" of `generate`, and reuses that routing
at the call's "decode" steps. Rows with no selected expert, and text-only rows, are untouched.
The features, routing and residual come from `features.py`, the path training also takes.
The config's `expert_mixing` and `visual_key` switch to the paper's ablations -SR and HR*
(docs/ABLATIONS.md).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from editors.base import TrainableEditor
from utils.devices import resolve_dtype
from utils.errors import UserError
from utils.records import EditRecord, Sample
from .config import LiveEditConfig
from .features import edit_visual_keys, expert_residual, prototype_similarity, query_weights, visual_features
from .modules import ExpertGenerator, FeatureExtractor
from .repository import ExpertRepository
from .routing import gather_spans, similarity


class LiveEdit(TrainableEditor):
    name = "liveedit"
    config_class = LiveEditConfig
    supports_batch_edit = True  # one forward for many requests gives the experts of one by one
    saves_edits = True          # the expert repository (safetensors + manifest)
    edits_text_only = False     # hard routing keys are visual: every request needs an image
    supports_sharded_training = True  # torchrun: rows of the global batch per rank (training.py)

    def __init__(self, vllm, config: LiveEditConfig):
        super().__init__(vllm, config)
        if not 0 <= config.edit_layer_i < vllm.num_layers:
            raise UserError(f"edit_layer_i={config.edit_layer_i} but {vllm.name} has layers "
                            f"0..{vllm.num_layers - 1}; change edit_layer_i in the LiveEdit config")
        rc, d = config.retrieval_editor, vllm.hidden_size
        self.edit_extractor = FeatureExtractor(rc.eqe_n, d, rc.module_dim, rc.cross_att_head_n)
        # the prototype's length is its own (it is only read as attention keys): the image's token
        # count may vary, the prototype stays [1, prototype_tokens, D]
        self.inpt_extractor = FeatureExtractor(rc.eqe_n, d, rc.module_dim, rc.cross_att_head_n,
                                               vision_tokens=config.vision_prototype_tokens or vllm.prototype_tokens)
        self.moegen_c = ExpertGenerator(d, rc.lora_rank, rc.lora_scale, rc.module_dim, rc.cross_att_head_n)  # U
        self.moegen_r = ExpertGenerator(d, rc.lora_rank, rc.lora_scale, rc.module_dim, rc.cross_att_head_n)  # V
        self.instant_reps_norm = nn.LayerNorm(d)
        home = vllm.device_of_layer(config.edit_layer_i)  # where layer l_e runs (vllm.device without a device map)
        for module in self.trainable_modules().values():
            module.to(home)
        self.sim_scale = config.sim_scale if config.sim_scale is not None else 1.0 / math.sqrt(rc.module_dim)
        repository_dtype = vllm.dtype if config.repository_dtype == "auto" else resolve_dtype(config.repository_dtype)
        self.repository = ExpertRepository(rc.eqe_n, rc.module_dim, rc.lora_rank, d,
                                           dtype=repository_dtype, device=home)
        self.set_train(False)
        self.hook_layer(config.edit_layer_i, self._edit_hidden)

    # ---- Editor API ----------------------------------------------------------------------------
    @property
    def pooled_visual_key(self) -> bool:
        """Whether hard routing compares the whole image, mean-pooled (HR*), not the prompt-led features."""
        return self.config.visual_key == "pooled"

    @property
    def num_edits(self) -> int:
        return len(self.repository)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"edit_extractor": self.edit_extractor, "inpt_extractor": self.inpt_extractor,
                "moegen_c": self.moegen_c, "moegen_r": self.moegen_r, "instant_reps_norm": self.instant_reps_norm}

    def restore(self) -> None:
        self.repository.clear()

    @torch.no_grad()
    def edit(self, requests: list[Sample]) -> None:
        """Add one expert per request; all requests go through the backbone in one batch."""
        if not requests:
            return
        if any(r.image is None for r in requests):
            raise UserError("LiveEdit edits image requests only (hard routing needs the image); "
                            "got a text-only request")
        batch = self.vllm.prepare([r.prompt for r in requests], [r.image for r in requests],
                                  [r.target for r in requests])
        hidden = self.edit_layer_output(batch)  # [b, l, D]
        keys = self.make_edit_keys(hidden, batch)
        self.repository.add(list(requests), **keys)

    def save_edits(self, directory: str) -> None:
        self.repository.save(directory, info={"backbone": self.vllm.name, "editor": self.name})

    def load_edits(self, directory: str) -> None:
        info = self.repository.load(directory)
        if info.get("backbone") not in (None, self.vllm.name):
            raise UserError(f"the expert repository in {directory} was made on {info['backbone']}, "
                            f"this editor runs on {self.vllm.name}")

    # ---- edit side -------------------------------------------------------------------------------
    def edit_layer_output(self, batch) -> torch.Tensor:
        """Output of layer l_e on the UNEDITED model (every layer edit off for this pass)."""
        with self.vllm.unedited():
            return self.vllm.hidden_at_layer(batch, self.config.edit_layer_i)

    def make_edit_keys(self, hidden: torch.Tensor, batch) -> dict[str, torch.Tensor]:
        """Routing keys and expert factors of each row: hidden [b, l, D] -> fields of the repository."""
        hidden, batch = hidden.to(self.instant_reps_norm.weight.dtype), batch.to(hidden.device)
        vision, vision_mask = gather_spans(hidden, batch.vision_spans)  # [b, n_img, D]
        query, query_mask = gather_spans(hidden, batch.query_spans)  # [b, lq, D]
        edit_span = torch.stack([batch.vision_spans[:, 0], batch.target_spans[:, 1]], dim=1)  # [v0, t1)
        reps, reps_mask = gather_spans(hidden, edit_span)  # [b, n_img + lq + la, D]
        return {"query_keys": self.edit_extractor.extract_query(query, query_mask),  # [b, e, md]
                "vision_keys": edit_visual_keys(self.edit_extractor, query, query_mask, vision, vision_mask,
                                                self.pooled_visual_key),  # [b, e, md]
                "up": self.moegen_c(reps, reps_mask),  # [b, r, D]
                "down": self.moegen_r(reps, reps_mask)}  # [b, r, D]

    # ---- inference side ------------------------------------------------------------------------
    def route(self, hidden: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample expert weights of the image rows of `batch`.

        Returns (rows [k], experts [s], weights [k, s]): rows that select at least one expert, the
        union of their selected experts, and each row's soft weight of each (0 if not selected).
        """
        empty, batch = hidden.new_zeros(0, dtype=torch.long), batch.to(hidden.device)
        rows = batch.has_image.nonzero().flatten()  # [k]
        if len(rows) == 0 or len(self.repository) == 0:
            return empty, empty, hidden.new_zeros(0, 0)
        h = hidden[rows].to(self.instant_reps_norm.weight.dtype)  # [k, l, D]
        vision, vision_mask = gather_spans(h, batch.vision_spans[rows])
        query, query_mask = gather_spans(h, batch.query_spans[rows])
        ext, pooled = self.inpt_extractor, self.pooled_visual_key
        visual, summary = visual_features(ext, query, query_mask, vision, vision_mask, pooled)  # [k, e, md] x2
        visual_sim = similarity(visual, self.repository.view("vision_keys"), self.sim_scale)  # [k, m]
        prototype_sim = prototype_similarity(ext, visual, query, query_mask, summary, self.sim_scale, pooled)  # [k]
        selected = visual_sim > prototype_sim[:, None]  # [k, m] hard routing
        keep_rows = selected.any(dim=1)  # [k]
        experts = selected.any(dim=0).nonzero().flatten()  # [s]
        if len(experts) == 0:
            return empty, empty, hidden.new_zeros(0, 0)
        weights = query_weights(ext, query[keep_rows], query_mask[keep_rows], self.repository.view("query_keys"),
                                selected[keep_rows], self.sim_scale, experts, self.config.expert_mixing)  # [k', s]
        return rows[keep_rows], experts, weights

    @torch.no_grad()
    def routing_of(self, samples: list[Sample], own: list[int | None], batch_size: int) -> list[dict]:
        """Per image sample: experts selected by hard routing, and whether / how much expert own[i] is used."""
        out = []
        for start in range(0, len(samples), batch_size):
            part = samples[start:start + batch_size]
            batch = self.vllm.prepare([s.prompt for s in part], [s.image for s in part], [s.target for s in part])
            with self.vllm.unedited():
                hidden = self.vllm.hidden_at_layer(batch, self.config.edit_layer_i)  # [b, l, D]
            rows, experts, weights = self.route(hidden, batch)  # [k], [s], [k, s]
            chosen = weights > 0  # a selected expert's weight is softmax x sigmoid > 0
            for i, own_index in enumerate(own[start:start + batch_size]):
                hit = (rows == i).nonzero().flatten()
                if len(hit) == 0:
                    out.append({"selected": 0, "own_selected": False, "own_weight": 0.0})
                    continue
                row_weights = weights[hit[0]]  # [s]
                mine = (experts == own_index).nonzero().flatten() if own_index is not None else hit[:0]
                own_weight = float(row_weights[mine[0]]) if len(mine) else 0.0
                out.append({"selected": int(chosen[hit[0]].sum()), "own_selected": own_weight > 0,
                            "own_weight": own_weight})
        return out

    def residual(self, hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_m c_m ReLU(U_m LN(h)) V_m of repository experts: hidden [k, l, D], experts [s], weights [k, s]
        -> [k, l, D] in hidden's dtype; the products in the repository's dtype, in chunks of experts."""
        repo = self.repository
        return expert_residual(self.instant_reps_norm, hidden, repo.view("up"), repo.view("down"), weights,
                               repo.dtype, experts).to(hidden.dtype)  # [k, l, D]

    def _edit_hidden(self, hidden: torch.Tensor, call) -> torch.Tensor | None:
        """The layer-l_e edit: hidden [b, l, D] -> hidden + residual on the routed rows (None: unchanged)."""
        if self.is_training or len(self.repository) == 0:
            return None
        if call.phase == "decode":  # reuse the routing of this generate call's prefill
            if "route" not in call.memo:
                return None
            rows, experts, weights = call.memo["route"]
        else:  # "full" or "prefill"
            rows, experts, weights = call.memo["route"] = self.route(hidden, call.batch)
        if len(rows) == 0:
            return None
        edited = hidden.clone()
        edited[rows] = hidden[rows] + self.residual(hidden[rows], experts, weights)
        return edited

    # ---- training (see training.py) ----------------------------------------------------------------
    is_training = False

    def set_train(self, mode: bool) -> None:
        super().set_train(mode)
        self.is_training = mode

    def make_optimizer(self):
        from .training import make_optimizer

        return make_optimizer(self)

    def training_batch(self, records: list[EditRecord], rng: np.random.Generator):
        from .training import prepare_training_batch

        return prepare_training_batch(self, records, rng)

    def train_step(self, batch) -> dict[str, float]:
        from .training import training_step

        return training_step(self, batch)
