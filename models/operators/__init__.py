"""Forward operators ``A`` of inverse problems ``y = A(x) + noise``.

See :mod:`models.operators.base` for the contract (shapes, SVD convention, pseudo-inverse).
"""

from models.operators.averaging import Colorization, Downsample
from models.operators.base import SVD, LinearOperator, Operator, check_adjoint, conjugate_gradient
from models.operators.basic import Identity, Mask, Matrix
from models.operators.blur import Blur, CircularBlur, SeparableBlur, gaussian_kernel, uniform_kernel
from models.operators.compose import Compose, LinearCompose
from models.operators.fourier import Fourier
from models.operators.nonlinear import PhaseRetrieval, Saturation
from models.operators.radon import Radon

__all__ = [
    "Operator",
    "LinearOperator",
    "SVD",
    "check_adjoint",
    "conjugate_gradient",
    "Identity",
    "Mask",
    "Matrix",
    "Downsample",
    "Colorization",
    "Blur",
    "SeparableBlur",
    "CircularBlur",
    "gaussian_kernel",
    "uniform_kernel",
    "Fourier",
    "Radon",
    "PhaseRetrieval",
    "Saturation",
    "Compose",
    "LinearCompose",
]
