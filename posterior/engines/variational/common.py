r"""What the variational engines share: the SNR weightings of score distillation and Adam's
moments as tensors (:class:`AdamMoments`). The diffusion log-density estimates they use live in
:mod:`diffpost.models.densities`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["AdamMoments", "SNR_WEIGHTINGS"]

#: RED-diff's weightings of the distillation term, functions of the noise ratio
#: :math:`r = \sigma_t / \alpha_t = 1/\sqrt{\mathrm{SNR}_t}` (NVlabs/RED-diff
#: ``denoise_term_weight``)
SNR_WEIGHTINGS: dict[str, Callable[[Tensor], Tensor]] = {
    "linear": lambda r: r,
    "sqrt": torch.sqrt,
    "square": torch.square,
    "log": torch.log1p,
    "trunc_linear": lambda r: r.clamp(max=1.0),
    "power2over3": lambda r: r ** (2.0 / 3.0),
    "const": torch.ones_like,
}


class AdamMoments(NamedTuple):
    r"""Adam's moment estimates as plain tensors, so that an optimising engine's state holds no
    optimiser: :meth:`update` returns the step and the new moments (Kingma & Ba 2015, Alg. 1, with
    PyTorch's placement of :math:`\epsilon`, so it follows ``torch.optim.Adam`` update for update).

    Attributes:
        first, second: the running means of the gradient and of its square, the parameters' shape.
    """

    first: Tensor
    second: Tensor

    @classmethod
    def zeros_like(cls, parameters: Tensor) -> AdamMoments:
        return cls(torch.zeros_like(parameters), torch.zeros_like(parameters))

    def update(
        self,
        gradient: Tensor,
        count: int,
        learning_rate: float | Tensor,
        betas: tuple[float, float],
        eps: float = 1e-8,
    ) -> tuple[Tensor, AdamMoments]:
        r"""``(step, moments)`` of the ``count``-th update (from 1): the parameters become
        ``parameters + step``, with :math:`m \leftarrow \beta_1 m + (1 - \beta_1) g`,
        :math:`v \leftarrow \beta_2 v + (1 - \beta_2) g^2` and step
        :math:`-\eta\, \hat m / (\sqrt{\hat v} + \epsilon)` (bias-corrected)."""
        beta1, beta2 = betas
        first = self.first.lerp(gradient, 1 - beta1)
        second = beta2 * self.second + (1 - beta2) * gradient * gradient
        correction1, correction2 = 1 - beta1**count, 1 - beta2**count
        denominator = second.sqrt() / math.sqrt(correction2) + eps
        return -(learning_rate / correction1) * first / denominator, AdamMoments(first, second)
