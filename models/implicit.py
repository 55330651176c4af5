r"""The two networks of an implicit amortized posterior trained by score distillation (DAVI, Lee,
Park, Kong, Kim 2024), on flat vectors.

- :class:`ImplicitGenerator`: :math:`\hat x = u + f_\phi(u)` with :math:`u = c + h z`, the context
  :math:`c` (the measurement brought to the signal's space) perturbed by injected noise
  :math:`h z`, :math:`z \sim \mathcal{N}(0, I)`; the official generator is a UNet read as
  :math:`\hat x = \tanh(u - \sigma\, \mathrm{net}(u))`, a residual on its noised input.
- :class:`AuxiliaryDenoiser`: the score network :math:`D_\psi` of the generator's own outputs,
  :math:`D_\psi(x_t, t \,[, c]) = D_\theta(x_t, t) + g_\psi(x_t, t \,[, c])` with the teacher's
  Tweedie mean :math:`D_\theta` given and :math:`g_\psi` initialised at zero, so that it starts as
  the teacher (the official code initialises it from the pretrained network).

Both are MLPs of two hidden layers with SiLU activations and a zero output layer (the untrained
generator returns its input, the untrained auxiliary network the teacher).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffpost.models.networks import sinusoidal_embedding

__all__ = ["AuxiliaryDenoiser", "ImplicitGenerator"]

#: width of the sinusoidal time features of :class:`AuxiliaryDenoiser`
TIME_FEATURES = 32


def _mlp(inputs: int, hidden: int, outputs: int, generator: torch.Generator) -> nn.Sequential:
    """Two hidden SiLU layers, PyTorch's default initialisation drawn from ``generator``, a zero
    output layer."""
    layers = [nn.Linear(inputs, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, outputs)]
    with torch.no_grad():
        for layer in layers[:-1]:
            bound = layer.in_features**-0.5
            for tensor in (layer.weight, layer.bias):
                tensor.copy_((2 * torch.rand(tensor.shape, generator=generator) - 1) * bound)
        layers[-1].weight.zero_()
        layers[-1].bias.zero_()
    return nn.Sequential(layers[0], nn.SiLU(), layers[1], nn.SiLU(), layers[2])


class ImplicitGenerator(nn.Module):
    """:math:`\\hat x = u + f_\\phi(u)`, :math:`u = c + h z`: an implicit :math:`q_\\phi(x \\mid
    c)` on flat vectors (see the module docstring).

    Args:
        dim: the flattened signal size; contexts have the same size.
        hidden_features: width of the two hidden layers.
        noise_scale: :math:`h`, the injected noise's standard deviation.
        generator: draws the initial weights.
    """

    def __init__(
        self, dim: int, hidden_features: int, noise_scale: float, generator: torch.Generator
    ):
        super().__init__()
        self.dim, self.noise_scale = dim, noise_scale
        self.net = _mlp(dim, hidden_features, dim, generator)

    def push_forward(self, z: Tensor, context: Tensor) -> tuple[Tensor, None]:
        """``(x, None)`` for base draws ``z`` and contexts, both ``(B, dim)``: the density of an
        implicit sampler is unknown."""
        u = context + self.noise_scale * z
        return u + self.net(u), None


class AuxiliaryDenoiser(nn.Module):
    """:math:`g_\\psi(x_t, t \\,[, c])`, the correction that :math:`D_\\psi = D_\\theta + g_\\psi`
    adds to the teacher's Tweedie mean (see the module docstring).

    Args:
        dim: the flattened signal size.
        context_dim: the context's size (0: unconditional, as the official DAVI).
        hidden_features: width of the two hidden layers.
        generator: draws the initial weights.
    """

    def __init__(
        self, dim: int, context_dim: int, hidden_features: int, generator: torch.Generator
    ):
        super().__init__()
        self.dim, self.context_dim = dim, context_dim
        self.net = _mlp(dim + context_dim + TIME_FEATURES, hidden_features, dim, generator)

    def forward(self, x_t: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        """The correction ``(B, dim)`` at flat ``x_t`` ``(B, dim)``, times ``t`` ``(B,)`` in
        ``[0, 1]`` and, when conditional, contexts ``(B, context_dim)``."""
        parts = [x_t, sinusoidal_embedding(1000 * t, TIME_FEATURES).to(x_t)]
        if self.context_dim:
            parts.append(context)
        return self.net(torch.cat(parts, dim=-1))
