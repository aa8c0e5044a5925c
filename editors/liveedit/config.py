"""LiveEdit hyper-parameters (the paper's defaults; spec §6.1). Nested names follow the paper's YAML.

Each dataclass checks its values in `__post_init__` and raises a `UserError` naming the key;
`utils.config.load_config` adds the file (and the section) to the message.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from utils.devices import resolve_dtype
from utils.errors import UserError


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
    """Optimiser, LR schedule and loss weights of editor training."""

    lr: float = 1e-4                                          # Adam learning rate
    lr_cut_it: list[int] = field(default_factory=lambda: [10000])  # LR milestones (steps)
    lr_cut_rate: float = 0.1                                  # LR factor per milestone passed
    rel_lambda: float = 1.0
    gen_lambda: float = 1.0
    loc_lambda: float = 1.0
    soft_routing_lambda: float = 1.0
    hard_routing_lambda: float = 1.0
    eps: float = 1e-8                                         # inside the logs of the routing losses

    def __post_init__(self) -> None:
        lambdas = ("rel_lambda", "gen_lambda", "loc_lambda", "soft_routing_lambda", "hard_routing_lambda")
        _require([
            (self.lr > 0, f"lr must be positive, got {self.lr!r}"),
            (all(_positive_int(step) for step in self.lr_cut_it),
             f"lr_cut_it must list steps of at least 1, got {self.lr_cut_it!r}"),
            (self.lr_cut_rate > 0, f"lr_cut_rate must be positive, got {self.lr_cut_rate!r}"),
            *[(getattr(self, name) >= 0, f"{name} must be 0 or more, got {getattr(self, name)!r}")
              for name in lambdas],
            (self.eps > 0, f"eps must be positive, got {self.eps!r}"),
        ])


@dataclass
class LiveEditConfig:
    edit_layer_i: int = 21                  # l_e, 0-based decoder layer whose output is edited
    retrieval_editor: RetrievalEditorConfig = field(default_factory=RetrievalEditorConfig)
    train_cfg: TrainConfig = field(default_factory=TrainConfig)
    repository_dtype: str = "auto"          # dtype of stored keys and experts: auto (= the backbone's) | float32 |
                                            # bfloat16 | float16; the residual's matmuls run in it
    sim_scale: float | None = None          # similarity scale; None = 1/sqrt(module_dim) as in the paper
    vision_prototype_tokens: int | None = None  # length of the learned visual prototype; None = the backbone's
                                            # `prototype_tokens` (its fixed image-token count on the paper's
                                            # backbones; a fixed cap where the count varies by image)

    def __post_init__(self) -> None:
        _require([
            (isinstance(self.edit_layer_i, int) and self.edit_layer_i >= 0,
             f"edit_layer_i must be a layer index of 0 or more, got {self.edit_layer_i!r}"),
            (self.vision_prototype_tokens is None or _positive_int(self.vision_prototype_tokens),
             f"vision_prototype_tokens must be a positive integer or null, got {self.vision_prototype_tokens!r}"),
            (self.sim_scale is None or self.sim_scale > 0, f"sim_scale must be positive, got {self.sim_scale!r}"),
        ])
        if self.repository_dtype != "auto":
            try:
                resolve_dtype(self.repository_dtype)
            except UserError as exc:
                raise UserError(f"repository_dtype: {exc} (or auto = the backbone's)") from None
