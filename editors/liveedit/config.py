"""LiveEdit hyper-parameters (the paper's defaults; spec §6.1). Nested names follow the paper's YAML."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RetrievalEditorConfig:
    """Sizes of the feature extractors f_fe and the expert generator f_eg."""

    module_dim: int = 1024      # width md of the extractor / generator attention
    cross_att_head_n: int = 8   # attention heads
    lora_rank: int = 4          # expert rank r
    eqe_n: int = 4              # learned query tokens e of each extractor
    lora_scale: float = 5.0     # generator output is scaled by 1 / (lora_scale * sqrt(r))


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


@dataclass
class LiveEditConfig:
    edit_layer_i: int = 21                  # l_e, 0-based decoder layer whose output is edited
    retrieval_editor: RetrievalEditorConfig = field(default_factory=RetrievalEditorConfig)
    train_cfg: TrainConfig = field(default_factory=TrainConfig)
    repository_dtype: str = "auto"          # dtype of stored keys and experts: auto (= the backbone's) | float32 |
                                            # bfloat16 | float16; the residual's matmuls run in it
    sim_scale: float | None = None          # similarity scale; None = 1/sqrt(module_dim) as in the paper
