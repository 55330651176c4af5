"""Forward operators ``A`` of inverse problems ``y = A(x) + noise``.

See :mod:`models.operators.base` for the contract (shapes, SVD convention, pseudo-inverse).
"""

from models.operators.base import SVD, LinearOperator, Operator, check_adjoint, conjugate_gradient
from models.operators.basic import Identity, Mask, Matrix

__all__ = [
    "Operator",
    "LinearOperator",
    "SVD",
    "check_adjoint",
    "conjugate_gradient",
    "Identity",
    "Mask",
    "Matrix",
]
