"""MEND's gradient transform (Mitchell et al. 2022, as the LiveEdit authors ran it; spec §7 "MEND-VL").

A linear layer's weight gradient on one token row is the outer product x δᵀ of its input x and its
output gradient δ. `GradientTransform` maps each row's (x, δ) to (x̃, δ̃):
  1. normalise x and δ with running mean / std (Welford; updated in training mode only),
  2. an `IDMLP` on the concatenation [x; δ]: `n_hidden + 1` low-rank residual layers, each
     h + clamp(scale_m * (U (V h) + b) + shift_m, min=0), identity at initialisation (U = 0),
     with a learned scale / shift per mode m (= which module of this weight shape is edited).
One transform is shared by all edited modules of one weight shape.
"""
from __future__ import annotations

import torch
from torch import nn


class LowRankResidual(nn.Module):
    """One IDMLP layer on [n, dim] rows: h + relu(mode_scale * (h Vᵀ Uᵀ + b) + mode_shift)."""

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator):
        super().__init__()
        self.u = nn.Parameter(torch.zeros(dim, rank))                          # [dim, r] identity init
        self.v = nn.Parameter(torch.randn(rank, dim, generator=generator))     # [r, dim]
        self.bias = nn.Parameter(torch.zeros(dim))                             # [dim]
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))               # [modes, dim]
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))              # [modes, dim]

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (h @ self.v.T) @ self.u.T + self.bias  # [n, dim]
        pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        # clamp, not relu: the authors' choice, so that the gradient at 0 is not 0; applied on every
        # layer (the authors' LRLinear ignores its `relu` flag)
        return h + pre.clamp(min=0)


class GradientTransform(nn.Module):
    """(x [n, d_in], δ [n, d_out]) rows -> transformed (x̃, δ̃), for one weight shape (d_in, d_out).

    Buffers (saved in checkpoints, so a resumed run normalises as the uninterrupted one):
    `count` rows seen, `x_mean` / `d_mean` running means, `x_m2` / `d_m2` sums of squared deviations.
    """

    def __init__(self, d_in: int, d_out: int, rank: int, n_hidden: int, n_modes: int, norm: bool,
                 generator: torch.Generator):
        super().__init__()
        self.d_in, self.d_out, self.norm = d_in, d_out, norm
        dim = d_in + d_out
        self.layers = nn.ModuleList(LowRankResidual(dim, min(rank, dim), n_modes, generator)
                                    for _ in range(n_hidden + 1))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("x_mean", torch.zeros(d_in))
        self.register_buffer("d_mean", torch.zeros(d_out))
        self.register_buffer("x_m2", torch.zeros(d_in))
        self.register_buffer("d_m2", torch.zeros(d_out))

    @torch.no_grad()
    def update_statistics(self, x: torch.Tensor, d: torch.Tensor) -> None:
        """Merge the rows' mean and squared deviations into the running ones (Chan et al.'s parallel
        form of Welford's update: the authors' row-by-row loop, up to float rounding)."""
        n = x.shape[0]
        if n == 0:
            return
        total = self.count + n
        for rows, mean, m2 in ((x, self.x_mean, self.x_m2), (d, self.d_mean, self.d_m2)):
            batch_mean = rows.mean(0)  # [dim]
            batch_m2 = ((rows - batch_mean) ** 2).sum(0)  # [dim]
            diff = batch_mean - mean
            mean += diff * (n / total).float()
            m2 += batch_m2 + diff ** 2 * (self.count * n / total).float()
        self.count.copy_(total)

    def _normalise(self, rows: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
        if not self.norm or self.count < 2:  # no statistics yet (an untrained editor): rows as they are
            return rows
        std = (m2 / (self.count.float() - 1)).sqrt()
        return (rows - mean) / (std + 1e-7)

    def forward(self, x: torch.Tensor, d: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, d_in], δ [n, d_out] (rows with a zero gradient already dropped) -> x̃ [n, d_in], δ̃ [n, d_out]."""
        x, d = x.float(), d.float()
        if self.training:
            self.update_statistics(x, d)
        h = torch.cat([self._normalise(x, self.x_mean, self.x_m2), self._normalise(d, self.d_mean, self.d_m2)], -1)
        for layer in self.layers:
            h = layer(h, mode)  # [n, d_in + d_out]
        return h[:, :self.d_in], h[:, self.d_in:]
