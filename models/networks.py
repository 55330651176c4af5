r"""A small UNet for diffusion models on 8x8 to 64x64 images.

:class:`UNet` maps ``(x_t, t) -> prediction`` with ``x_t`` of shape ``(N, C, H, W)`` and ``t`` of
shape ``(N,)`` (continuous time in ``[0, 1]``, or any real noise-level input) to a tensor of the
shape of ``x_t``. What the output means (noise, clean image, v, velocity) is decided by the
adapter that wraps it (:mod:`diffpost.models.denoisers`), not by the network.

Architecture (the DDPM UNet of Ho et al. 2020 with the attention layers removed and one residual
block per level, which is enough at these resolutions):

- a sinusoidal embedding of ``time_scale * t`` (Vaswani et al. 2017; DDPM feeds the integer step,
  so ``time_scale = 1000`` puts continuous time on the same footing) followed by a two-layer MLP;
- ``conv_in``, then per level ``i`` one :class:`ResidualBlock` to ``base_channels *
  channel_multipliers[i]`` channels (GroupNorm, SiLU, 3x3 convolution, the time embedding added
  between the two convolutions) and a stride-2 convolution down to the next level;
- the mirror path up: nearest-neighbour upsampling with a 3x3 convolution, concatenation of the
  skip connection of the same level, one residual block;
- GroupNorm, SiLU and a zero-initialised 3x3 output convolution, so that the untrained network
  predicts 0 (Nichol & Dhariwal 2021 initialise every residual branch's last layer at zero; here
  only the output, which is what makes early training stable at this size).

Each level halves the image, so ``H`` and ``W`` must be divisible by ``2 ** (levels - 1)``.

References:
    Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. arXiv:2006.11239.
    Ronneberger, Fischer, Brox. U-Net. MICCAI 2015. arXiv:1505.04597.
    Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. ICML 2021.
    arXiv:2102.09672.
    Vaswani et al. Attention Is All You Need. NeurIPS 2017 (sinusoidal embeddings).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["UNet", "ResidualBlock", "sinusoidal_embedding"]


def sinusoidal_embedding(values: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    r"""Sinusoidal features :math:`[\cos(v \omega_j), \sin(v \omega_j)]`, :math:`\omega_j =
    P^{-j/(d/2)}`.

    Args:
        values: shape ``(N,)``.
        dim: even number of features.
        max_period: ``P``, the longest period.

    Returns:
        Shape ``(N, dim)``.
    """
    half = dim // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=values.dtype, device=values.device) / half
    )
    angles = values[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the time embedding, GroupNorm-SiLU-conv, plus a (1x1) skip.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        embedding_dim: size of the time embedding.
        groups: GroupNorm groups (reduced to divide the channel count).
    """

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, groups: int):
        super().__init__()
        self.norm_in = nn.GroupNorm(math.gcd(groups, in_channels), in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embedding_dim, out_channels)
        self.norm_out = nn.GroupNorm(math.gcd(groups, out_channels), out_channels)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.conv_in(F.silu(self.norm_in(x)))
        h = h + self.time(embedding)[:, :, None, None]
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    """Small UNet ``(x (N, C, H, W), t (N,)) -> (N, C, H, W)``.

    Args:
        channels: image channels ``C``.
        base_channels: channels of the first level.
        channel_multipliers: one multiplier per level; ``(1, 2)`` has two levels (8x8 and 4x4
            on 8x8 images), ``(1, 2, 2)`` three.
        groups: GroupNorm groups.
        time_scale: the network embeds ``time_scale * t``.
        condition_channels: channels of an optional conditioning map ``(N, K, H, W)``
            concatenated to the input (not predicted): the patch coordinates of
            :mod:`diffpost.models.patches`, for instance. 0: no conditioning.

    Raises:
        ValueError: for non-positive sizes or an empty ``channel_multipliers``.
    """

    def __init__(
        self,
        channels: int = 1,
        base_channels: int = 32,
        channel_multipliers: tuple[int, ...] = (1, 2, 2),
        groups: int = 8,
        time_scale: float = 1000.0,
        condition_channels: int = 0,
    ):
        super().__init__()
        channel_multipliers = tuple(channel_multipliers)
        if min(channels, base_channels, groups) < 1:
            raise ValueError(
                f"UNet sizes must be positive; got channels={channels}, "
                f"base_channels={base_channels}, groups={groups}"
            )
        if isinstance(condition_channels, bool) or condition_channels < 0:
            raise ValueError(f"condition_channels must be >= 0; got {condition_channels!r}")
        if not channel_multipliers or min(channel_multipliers) < 1:
            raise ValueError(
                f"channel_multipliers must be positive integers; got {channel_multipliers}"
            )
        self.config = {
            "channels": channels,
            "base_channels": base_channels,
            "channel_multipliers": channel_multipliers,
            "groups": groups,
            "time_scale": time_scale,
        }
        if condition_channels:
            self.config["condition_channels"] = condition_channels
        self.condition_channels = condition_channels
        self.time_scale = time_scale
        self.embedding_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, self.embedding_dim),
            nn.SiLU(),
            nn.Linear(self.embedding_dim, self.embedding_dim),
        )
        widths = [base_channels * m for m in channel_multipliers]
        self.conv_in = nn.Conv2d(channels + condition_channels, base_channels, 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        previous = base_channels
        for level, width in enumerate(widths):
            self.down_blocks.append(ResidualBlock(previous, width, self.embedding_dim, groups))
            if level < len(widths) - 1:
                self.downsamples.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
            previous = width
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            if level < len(widths) - 1:
                self.upsamples.append(nn.Conv2d(previous, previous, 3, padding=1))
            self.up_blocks.append(
                ResidualBlock(previous + width, width, self.embedding_dim, groups)
            )
            previous = width
        self.norm_out = nn.GroupNorm(math.gcd(groups, previous), previous)
        self.conv_out = nn.Conv2d(previous, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        levels = len(self.down_blocks)
        factor = 2 ** (levels - 1)
        if x.dim() != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"UNet with {levels} levels needs (N, C, H, W) with H and W divisible by "
                f"{factor}; got {tuple(x.shape)}"
            )
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        embedding = self.time_mlp(
            sinusoidal_embedding(self.time_scale * t, self.time_mlp[0].in_features)
        )
        if (condition is None) != (self.condition_channels == 0):
            raise ValueError(
                f"this UNet takes {self.condition_channels} condition channels; got "
                f"{'none' if condition is None else tuple(condition.shape)}"
            )
        h = self.conv_in(x if condition is None else torch.cat([x, condition], dim=1))
        skips = []
        for level, block in enumerate(self.down_blocks):
            h = block(h, embedding)
            skips.append(h)
            if level < levels - 1:
                h = self.downsamples[level](h)
        for index, block in enumerate(self.up_blocks):
            if index > 0:
                h = self.upsamples[index - 1](F.interpolate(h, scale_factor=2, mode="nearest"))
            h = block(torch.cat([h, skips.pop()], dim=1), embedding)
        return self.conv_out(F.silu(self.norm_out(h)))
