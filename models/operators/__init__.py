"""Forward operators ``A`` of inverse problems ``y = A(x) + noise``.

See :mod:`diffpost.models.operators.base` for the contract (shapes, SVD convention, pseudo-inverse).
"""

from diffpost.models.operators.averaging import Colorization, Downsample
from diffpost.models.operators.base import (
    SVD,
    LinearOperator,
    Operator,
    check_adjoint,
    conjugate_gradient,
)
from diffpost.models.operators.basic import Diagonal, Identity, Mask, Matrix
from diffpost.models.operators.blur import (
    Blur,
    CircularBlur,
    SeparableBlur,
    convolve,
    gaussian_kernel,
    uniform_kernel,
)
from diffpost.models.operators.compose import (
    Compose,
    LinearCompose,
    LinearPerProblem,
    LinearStack,
    PerProblem,
    Stack,
)
from diffpost.models.operators.fourier import Fourier
from diffpost.models.operators.nonlinear import PhaseRetrieval, Saturation
from diffpost.models.operators.radon import Radon

__all__ = [
    "Operator",
    "LinearOperator",
    "SVD",
    "check_adjoint",
    "conjugate_gradient",
    "Identity",
    "Mask",
    "Matrix",
    "Diagonal",
    "Downsample",
    "Colorization",
    "Blur",
    "SeparableBlur",
    "CircularBlur",
    "gaussian_kernel",
    "uniform_kernel",
    "convolve",
    "Fourier",
    "Radon",
    "PhaseRetrieval",
    "Saturation",
    "Compose",
    "LinearCompose",
    "LinearPerProblem",
    "LinearStack",
    "PerProblem",
    "Stack",
]
