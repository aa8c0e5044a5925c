"""LiveEdit hyper-parameters (the paper's defaults; spec §6.1). Nested names follow the paper's YAML.

Each dataclass checks its values in `__post_init__` and raises a `UserError` naming the key;
`utils.config.load_config` adds the file (and the section) to the message.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from utils.devices import resolve_dtype
from utils.errors import UserError

EXPERT_MIXING = ("soft", "mean")  # how the hard-selected experts are weighted (LiveEdit: soft)
VISUAL_KEYS = ("learned", "pooled")  # what hard routing compares (LiveEdit: learned)


def _require(checks: list[tuple[bool, str]]) -> None:
    """Raise a UserError with the message of the first failed check."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class RetrievalEditorConfig:
    """Sizes of the feature extractors f_fe and the expert generator f_eg."""

    module_dim: int = 1024      # width md of the extractor / generator attention
    cross_att_head_n: int = 8   # attention heads
    lora_rank: int = 4          # expert rank r
    eqe_n: int = 4              # learned query tokens e of each extractor
    lora_scale: float = 5.0     # generator output is scaled by 1 / (lora_scale * sqrt(r))

    def __post_init__(self) -> None:
        _require([
            (_positive_int(self.module_dim), f"module_dim must be a positive integer, got {self.module_dim!r}"),
            (_positive_int(self.cross_att_head_n),
             f"cross_att_head_n must be a positive integer, got {self.cross_att_head_n!r}"),
            (_positive_int(self.lora_rank), f"lora_rank must be at least 1, got {self.lora_rank!r}"),
            (_positive_int(self.eqe_n), f"eqe_n must be at least 1, got {self.eqe_n!r}"),
            (self.lora_scale > 0, f"lora_scale must be positive, got {self.lora_scale!r}"),
        ])
        if self.module_dim % self.cross_att_head_n:
            raise UserError(f"module_dim ({self.module_dim}) must be divisible by cross_att_head_n "
                            f"({self.cross_att_head_n})")


@dataclass
class TrainConfig:
    """Optimiser, LR schedule and loss weights of editor training.

    The soft-routing loss has two terms with a weight each (the paper's l_sr1 and l_sr2, Table 2):
    `soft_routing_abs_lambda` scales the absolute term (own expert's sigmoid up, the previous
    record's down) and `soft_routing_rel_lambda` the relative one (InfoNCE over the batch). A weight
    of 0 is that term's ablation: the term is then not computed at all. `soft_routing_lambda` is the
    old single weight of both (configs and checkpoints written before the split): when given, it
    sets both and must not be combined with the new keys; it is then stored as null.
    """

    lr: float = 1e-4                                          # Adam learning rate
    lr_cut_it: list[int] = field(default_factory=lambda: [10000])  # LR milestones (steps)
    lr_cut_rate: float = 0.1                                  # LR factor per milestone passed
    rel_lambda: float = 1.0
    gen_lambda: float = 1.0
    loc_lambda: float = 1.0
    soft_routing_abs_lambda: float | None = None              # absolute soft-routing term (l_sr1); None = 1
    soft_routing_rel_lambda: float | None = None              # relative soft-routing term (l_sr2); None = 1
    hard_routing_lambda: float = 1.0
    eps: float = 1e-8                                         # inside the logs of the routing losses
    soft_routing_lambda: float | None = None                  # OLD key: both soft-routing weights at once

    def __post_init__(self) -> None:
        self._resolve_soft_routing_lambdas()
        lambdas = ("rel_lambda", "gen_lambda", "loc_lambda", "soft_routing_abs_lambda", "soft_routing_rel_lambda",
                   "hard_routing_lambda")
        _require([
            (self.lr > 0, f"lr must be positive, got {self.lr!r}"),
            (all(_positive_int(step) for step in self.lr_cut_it),
             f"lr_cut_it must list steps of at least 1, got {self.lr_cut_it!r}"),
            (self.lr_cut_rate > 0, f"lr_cut_rate must be positive, got {self.lr_cut_rate!r}"),
            *[(getattr(self, name) >= 0, f"{name} must be 0 or more, got {getattr(self, name)!r}")
              for name in lambdas],
            (self.eps > 0, f"eps must be positive, got {self.eps!r}"),
        ])

    def _resolve_soft_routing_lambdas(self) -> None:
        """The old `soft_routing_lambda` becomes both new weights; unset new weights are 1 (the paper's)."""
        legacy = self.soft_routing_lambda
        if legacy is not None:
            given = [n for n in ("soft_routing_abs_lambda", "soft_routing_rel_lambda") if getattr(self, n) is not None]
            if given:
                raise UserError(f"soft_routing_lambda (the old single weight of both soft-routing terms) cannot be "
                                f"combined with {' and '.join(given)}; keep only soft_routing_abs_lambda and "
                                f"soft_routing_rel_lambda")
            self.soft_routing_abs_lambda = self.soft_routing_rel_lambda = legacy
            self.soft_routing_lambda = None  # stored once, under the new keys
        for name in ("soft_routing_abs_lambda", "soft_routing_rel_lambda"):
            if getattr(self, name) is None:
                setattr(self, name, 1.0)


@dataclass
class LiveEditConfig:
    """Everything that builds a LiveEdit; `expert_mixing` and `visual_key` are the paper's Table-2
    ablations -SR and HR* (docs/ABLATIONS.md); their defaults are LiveEdit itself."""

    edit_layer_i: int = 21                  # l_e, 0-based decoder layer whose output is edited
    retrieval_editor: RetrievalEditorConfig = field(default_factory=RetrievalEditorConfig)
    train_cfg: TrainConfig = field(default_factory=TrainConfig)
    repository_dtype: str = "auto"          # dtype of stored keys and experts: auto (= the backbone's) | float32 |
                                            # bfloat16 | float16; the residual's matmuls run in it
    sim_scale: float | None = None          # similarity scale; None = 1/sqrt(module_dim) as in the paper
    vision_prototype_tokens: int | None = None  # length of the learned visual prototype; None = the backbone's
                                            # `prototype_tokens` (its fixed image-token count on the paper's
                                            # backbones; a fixed cap where the count varies by image)
    expert_mixing: str = "soft"             # soft: selected experts weighted by softmax x sigmoid of the query
                                            # similarity (LiveEdit) | mean: each selected expert 1/k (-SR)
    visual_key: str = "learned"             # learned: hard routing on prompt-conditioned visual features
                                            # (LiveEdit) | pooled: on the whole image, mean-pooled and
                                            # projected, no prompt (HR*)

    def __post_init__(self) -> None:
        _require([
            (isinstance(self.edit_layer_i, int) and self.edit_layer_i >= 0,
             f"edit_layer_i must be a layer index of 0 or more, got {self.edit_layer_i!r}"),
            (self.vision_prototype_tokens is None or _positive_int(self.vision_prototype_tokens),
             f"vision_prototype_tokens must be a positive integer or null, got {self.vision_prototype_tokens!r}"),
            (self.sim_scale is None or self.sim_scale > 0, f"sim_scale must be positive, got {self.sim_scale!r}"),
            (self.expert_mixing in EXPERT_MIXING,
             f"expert_mixing must be one of {', '.join(EXPERT_MIXING)}, got {self.expert_mixing!r}"),
            (self.visual_key in VISUAL_KEYS,
             f"visual_key must be one of {', '.join(VISUAL_KEYS)}, got {self.visual_key!r}"),
        ])
        if self.repository_dtype != "auto":
            try:
                resolve_dtype(self.repository_dtype)
            except UserError as exc:
                raise UserError(f"repository_dtype: {exc} (or auto = the backbone's)") from None
