"""MEND-VL hyper-parameters: the LiveEdit authors' `configs/mend_vl/*.yaml` (spec §7) as defaults."""
from __future__ import annotations

from dataclasses import dataclass, field

from utils.errors import UserError


@dataclass
class MENDConfig:
    """Settings of `mend_vl`; every value is checked when the config is built."""

    layers: list[int] = field(default_factory=lambda: [-3, -2, -1])
    """Decoder layers whose FFN linears are edited (BLIP-2 fc1 / fc2; Llama gate / up / down_proj).
    Negative = from the end: the paper's layers 29-31 of 32 are the last three of any depth."""
    rank: int = 1920
    """Rank of each IDMLP layer; the effective rank is min(rank, d_in + d_out) of the weight shape (the
    authors' rule), i.e. full rank on the tiny backbones."""
    n_hidden: int = 1
    """IDMLP hidden layers: n_hidden + 1 low-rank residual layers (the paper: 1 -> 2 layers)."""
    norm: bool = True
    """Normalise x and δ by their running mean / std before the IDMLP."""
    init_edit_lr: float = 1e-4
    """Initial value of each edited module's learned edit learning rate."""
    edit_lr_lr: float = 1e-4
    """Adam learning rate of the edit learning rates."""
    lr: float = 1e-6
    """Adam learning rate of the gradient transforms (the authors' aux_model.lr)."""
    rel_lambda: float = 0.1
    """Weight of the reliability NLL in the training loss."""
    gen_lambda: float = 0.1
    """Weight of each generality NLL."""
    loc_lambda: float = 0.1
    """Weight of each locality KL(pre || post) (every locality type, text_loc included)."""
    grad_clip: float = 100.0
    """Gradient-norm clip of the gradient transforms; a non-finite norm stops training with an error."""
    batch_edit: bool = True
    """Let one `edit` call take a whole chunk (all its gradients on the model as it was before the
    chunk, as the authors' edit_batch); false: the evaluator edits one request at a time, each
    gradient on the model with the earlier edits in place (the authors' evaluator)."""
    seed: int = 0
    """Seed of the editor's own generator (the IDMLP's random V matrices)."""

    def __post_init__(self) -> None:
        checks = [
            (len(self.layers) > 0, "layers must name at least one decoder layer"),
            (len(set(self.layers)) == len(self.layers), f"layers has duplicates: {self.layers}"),
            (self.rank >= 1, f"rank must be at least 1, got {self.rank}"),
            (self.n_hidden >= 0, f"n_hidden must be 0 or more, got {self.n_hidden}"),
            (self.init_edit_lr == self.init_edit_lr, "init_edit_lr must be a number"),
            (self.edit_lr_lr >= 0, f"edit_lr_lr must be 0 or more, got {self.edit_lr_lr}"),
            (self.lr >= 0, f"lr must be 0 or more, got {self.lr}"),
            (min(self.rel_lambda, self.gen_lambda, self.loc_lambda) >= 0,
             "rel_lambda, gen_lambda and loc_lambda must be 0 or more"),
            (self.grad_clip > 0, f"grad_clip must be positive, got {self.grad_clip}"),
            (self.seed >= 0, f"seed must be 0 or more, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"MEND config: {message}")
