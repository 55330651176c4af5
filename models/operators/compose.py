"""Composition of operators: :class:`Compose` applies ``inner`` then ``outer``."""

from __future__ import annotations

from torch import Tensor

from diffpost.models.operators.base import LinearOperator, Operator

__all__ = ["Compose", "LinearCompose"]


class Compose(Operator):
    r"""The composition :math:`x \mapsto \mathrm{outer}(\mathrm{inner}(x))`.

    ``(*batch, *inner.in_shape) -> (*batch, *outer.out_shape)``. When both operators are linear
    the result is a :class:`~diffpost.models.operators.LinearOperator` (an instance of the subclass
    :class:`LinearCompose`) with adjoint ``inner.adjoint(outer.adjoint(y))``, no structured SVD,
    and the conjugate-gradient pseudo-inverse.

    Args:
        outer: the operator applied second.
        inner: the operator applied first; ``outer.in_shape`` must equal ``inner.out_shape``.

    Raises:
        ValueError: an argument is not an Operator, or the shapes do not chain.
    """

    def __new__(cls, outer: Operator | None = None, inner: Operator | None = None):
        # the defaults let copy and pickle recreate a subclass instance without arguments
        linear = getattr(outer, "is_linear", False) and getattr(inner, "is_linear", False)
        return super().__new__(LinearCompose if cls is Compose and linear else cls)

    def __init__(self, outer: Operator, inner: Operator):
        for name, operator in (("outer", outer), ("inner", inner)):
            if not isinstance(operator, Operator):
                raise ValueError(
                    f"Compose: {name} must be an Operator; got {type(operator).__name__}"
                )
        if outer.in_shape != inner.out_shape:
            raise ValueError(
                f"Compose: outer.in_shape {tuple(outer.in_shape)} must equal inner.out_shape "
                f"{tuple(inner.out_shape)}"
            )
        super().__init__(tuple(inner.in_shape), tuple(outer.out_shape))
        self.outer = outer
        self.inner = inner

    def _forward(self, x: Tensor) -> Tensor:
        return self.outer._forward(self.inner._forward(x))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(outer={self.outer!r}, inner={self.inner!r})"


class LinearCompose(Compose, LinearOperator):
    """The composition of two linear operators (what ``Compose`` returns for them)."""

    def _adjoint(self, y: Tensor) -> Tensor:
        return self.inner._adjoint(self.outer._adjoint(y))
