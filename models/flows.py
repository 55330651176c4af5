r"""Normalising flows that engines fit: :class:`RealNVP` (Dinh et al. 2017) on flat vectors.

The flow is a module for its architecture and initial parameters; an engine that trains it keeps
the parameters as tensors in its state and calls the flow with them through
:func:`torch.func.functional_call` (``forward`` pushes base draws forward, ``log_density`` gives
:math:`\log q` of given points), so the module itself is never updated.

References:
    Dinh, Sohl-Dickstein, Bengio. Density Estimation using Real NVP. ICLR 2017.
    Sun, Bouman. Deep Probabilistic Imaging. AAAI 2021 (official ``realnvp_model.py`` of
    github.com/berthyf96/score_prior, the architecture this follows).
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import DenseNN
from torch import Tensor, nn

__all__ = ["RealNVP"]

#: standard deviation of the coupling networks' hidden weights at initialisation (official init_std)
INIT_STD = 0.05


class RealNVP(nn.Module):
    """A RealNVP flow on flat vectors of size ``dim`` built from Pyro's transforms.

    Args:
        dim: the flattened signal size (at least 2).
        num_flow_steps: flow steps of two couplings each.
        hidden_features: width of the coupling networks' two hidden layers.
        generator: draws the fixed permutations and the initial hidden weights.
    """

    def __init__(
        self, dim: int, num_flow_steps: int, hidden_features: int, generator: torch.Generator
    ):
        super().__init__()
        self.dim = dim
        split = dim // 2
        couplings = []
        for _ in range(2 * num_flow_steps):
            # DenseNN initialises itself from the global RNG: leave it as it was (weights redrawn
            # below)
            with torch.random.fork_rng(devices=[]):
                network = DenseNN(
                    split,
                    [hidden_features, hidden_features],
                    [dim - split, dim - split],
                    nonlinearity=nn.LeakyReLU(0.01),
                )
            *hidden, output = [m for m in network.modules() if isinstance(m, nn.Linear)]
            with torch.no_grad():
                for layer in hidden:
                    layer.weight.copy_(
                        torch.randn(layer.weight.shape, generator=generator) * INIT_STD
                    )
                    layer.bias.zero_()
                output.weight.zero_()
                output.bias.zero_()
            couplings.append(T.AffineCoupling(split, network))
        self.couplings = nn.ModuleList(couplings)
        reversal = torch.arange(dim - 1, -1, -1)
        self.register_buffer("reversal", reversal)
        self.register_buffer(
            "permutations",
            torch.stack([torch.randperm(dim, generator=generator) for _ in range(num_flow_steps)]),
        )
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def transforms(self) -> list[T.Transform]:
        """The flow's bijections, base to output, on ``(..., dim)``."""
        parts: list[T.Transform] = []
        for index, permutation in enumerate(self.permutations):
            first, second = self.couplings[2 * index], self.couplings[2 * index + 1]
            parts += [first, T.Permute(self.reversal), second, T.Permute(self.reversal)]
            parts.append(T.Permute(permutation))
        parts.append(T.AffineTransform(self.loc, self.log_scale.exp(), event_dim=1, cache_size=1))
        return parts

    def base(self) -> dist.Distribution:
        """The standard normal base distribution on ``(dim,)``."""
        zeros = self.loc.new_zeros(self.dim)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def push_forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log q(x))`` for base draws ``z`` of shape ``(B, dim)``, differentiable in the
        parameters."""
        log_q = self.base().log_prob(z)
        x = z
        for part in self.transforms():
            y = part(x)
            log_q = log_q - part.log_abs_det_jacobian(x, y)
            x = y
        return x, log_q

    def distribution(self, event_shape: tuple[int, ...]) -> dist.TransformedDistribution:
        """The fitted :math:`q` as a Pyro distribution over signals of shape ``event_shape``."""
        reshape = T.ReshapeTransform((self.dim,), tuple(event_shape))
        return dist.TransformedDistribution(self.base(), self.transforms() + [reshape])

    def forward(self, value: Tensor, log_density: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        r"""``push_forward(value)`` (base draws ``(B, dim)`` -> ``(x, log q(x))``), or, with
        ``log_density``, :math:`\log q` of points ``value`` of shape ``(B, dim)``, ``(B,)``: the
        entry point of :func:`torch.func.functional_call`."""
        if log_density:
            return self.distribution((self.dim,)).log_prob(value)
        return self.push_forward(value)
