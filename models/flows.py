r"""Normalising flows that engines fit: :class:`RealNVP` (Dinh et al. 2017) on flat vectors, and
:class:`ConditionalRealNVP`, the same flow with every coupling also reading a context vector (an
amortized posterior's measurement).

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
from pyro.nn import ConditionalDenseNN, DenseNN
from torch import Tensor, nn

__all__ = ["ConditionalRealNVP", "RealNVP"]

#: standard deviation of the coupling networks' hidden weights at initialisation (official init_std)
INIT_STD = 0.05


def _initialise(network: nn.Module, generator: torch.Generator) -> None:
    """Hidden weights from N(0, INIT_STD^2), zero biases, a zero output layer (the untrained
    coupling is the identity)."""
    *hidden, output = [m for m in network.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer in hidden:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * INIT_STD)
            layer.bias.zero_()
        output.weight.zero_()
        output.bias.zero_()


def _push(parts: list[T.Transform], z: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, log q(x))``: standard normal base draws ``z`` ``(B, dim)`` pushed through ``parts``,
    the log-density corrected by each part's log-Jacobian."""
    log_q = dist.Normal(torch.zeros_like(z), torch.ones_like(z)).to_event(1).log_prob(z)
    x = z
    for part in parts:
        y = part(x)
        log_q = log_q - part.log_abs_det_jacobian(x, y)
        x = y
    return x, log_q


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
            _initialise(network, generator)
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
        return _push(self.transforms(), z)

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


class ConditionalRealNVP(nn.Module):
    """:class:`RealNVP` whose couplings also read a context vector: :math:`q(x \\mid c)`.

    The same steps (two couplings, reversals, a fixed random permutation) and initialisation,
    with Pyro's :class:`~pyro.distributions.transforms.ConditionalAffineCoupling` and
    :class:`~pyro.nn.ConditionalDenseNN` (the context concatenated to the conditioned half); the
    final elementwise affine map does not read the context. Trained in place (an ordinary module).

    Args:
        dim: the flattened signal size (at least 2).
        context_dim: the context's size.
        num_flow_steps: flow steps of two couplings each.
        hidden_features: width of the coupling networks' two hidden layers.
        generator: draws the fixed permutations and the initial hidden weights.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_flow_steps: int,
        hidden_features: int,
        generator: torch.Generator,
    ):
        super().__init__()
        self.dim, self.context_dim = dim, context_dim
        split = dim // 2
        couplings = []
        for _ in range(2 * num_flow_steps):
            with torch.random.fork_rng(devices=[]):
                network = ConditionalDenseNN(
                    split,
                    context_dim,
                    [hidden_features, hidden_features],
                    [dim - split, dim - split],
                    nonlinearity=nn.LeakyReLU(0.01),
                )
            _initialise(network, generator)
            couplings.append(T.ConditionalAffineCoupling(split, network))
        self.couplings = nn.ModuleList(couplings)
        self.register_buffer("reversal", torch.arange(dim - 1, -1, -1))
        self.register_buffer(
            "permutations",
            torch.stack([torch.randperm(dim, generator=generator) for _ in range(num_flow_steps)]),
        )
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def transforms(self, context: Tensor) -> list[T.Transform]:
        """The flow's bijections given ``context`` (``(B, context_dim)``, or one ``(context_dim,)``
        for every draw), base to output, on ``(B, dim)``."""
        parts: list[T.Transform] = []
        for index, permutation in enumerate(self.permutations):
            first = self.couplings[2 * index].condition(context)
            second = self.couplings[2 * index + 1].condition(context)
            parts += [first, T.Permute(self.reversal), second, T.Permute(self.reversal)]
            parts.append(T.Permute(permutation))
        parts.append(T.AffineTransform(self.loc, self.log_scale.exp(), event_dim=1, cache_size=1))
        return parts

    def push_forward(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log q(x | context))`` for base draws ``z`` ``(B, dim)`` and contexts ``(B,
        context_dim)``, differentiable in the parameters."""
        return _push(self.transforms(context), z)
