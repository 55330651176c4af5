"""Combinations of operators: :class:`Compose` applies ``inner`` then ``outer``; :class:`Stack`
concatenates several observations of one signal."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diffpost.models.operators.base import SVD, LinearOperator, Operator
from diffpost.models.operators.basic import Diagonal, Matrix

__all__ = ["Compose", "LinearCompose", "LinearPerProblem", "LinearStack", "PerProblem", "Stack"]


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


#: largest ``d`` (and ``m``) for which :class:`LinearStack` computes a dense SVD
DENSE_SVD_LIMIT = 4096


class Stack(Operator):
    r"""Several observations of one signal as one: :math:`x \mapsto [A_1 x; \dots; A_k x]`.

    ``(*batch, *in_shape) -> (*batch, m_1 + ... + m_k)``: each operator's output flattened and
    concatenated in order. When every operator is linear the result is a :class:`LinearStack`
    with adjoint :math:`\sum_i A_i^\top y_i` and, for ``d`` and ``m`` up to
    :data:`DENSE_SVD_LIMIT`, the SVD of the dense stacked matrix (computed once, cached).

    Args:
        operators: at least one operator, all with the same ``in_shape``.

    Raises:
        ValueError: no operator, a non-operator, or different input shapes.
    """

    def __new__(cls, *operators: Operator):
        linear = bool(operators) and all(getattr(op, "is_linear", False) for op in operators)
        return super().__new__(LinearStack if cls is Stack and linear else cls)

    def __init__(self, *operators: Operator):
        if not operators:
            raise ValueError("Stack needs at least one operator")
        for index, operator in enumerate(operators):
            if not isinstance(operator, Operator):
                raise ValueError(
                    f"Stack: operator {index} must be an Operator; got {type(operator).__name__}"
                )
            if operator.in_shape != operators[0].in_shape:
                raise ValueError(
                    f"Stack: operator {index} has in_shape {tuple(operator.in_shape)}; operator 0 "
                    f"has {tuple(operators[0].in_shape)} (one signal is observed)"
                )
        self.operators = tuple(operators)
        self.sizes = [math.prod(op.out_shape) for op in operators]
        super().__init__(tuple(operators[0].in_shape), (sum(self.sizes),))

    def _forward(self, x: Tensor) -> Tensor:
        return torch.cat([op._forward(x).reshape(x.shape[0], -1) for op in self.operators], -1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(op) for op in self.operators)})"


class LinearStack(Stack, LinearOperator):
    """A stack of linear operators (what ``Stack`` returns for them)."""

    def _adjoint(self, y: Tensor) -> Tensor:
        parts = torch.split(y, self.sizes, dim=-1)
        total = 0
        for operator, part in zip(self.operators, parts, strict=True):
            total = total + operator._adjoint(part.reshape(part.shape[0], *operator.out_shape))
        return total

    def svd(self) -> SVD | None:
        cached = getattr(self, "_svd", None)
        if cached is not None:
            return cached
        d, m = math.prod(self.in_shape), self.out_shape[0]
        if max(d, m) > DENSE_SVD_LIMIT:
            return None
        # the dense stack's SVD is Matrix's; only the signal's shape is added around it
        flat = Matrix(self.matrix()).svd()  # (m, d), float64
        shape = tuple(self.in_shape)

        def rows(x: Tensor) -> Tensor:
            return x.reshape(x.shape[0], -1)

        def signal(z: Tensor) -> Tensor:
            return z.reshape(z.shape[0], *shape)

        self._svd = SVD(
            singular_values=flat.singular_values,
            vt=lambda x: flat.vt(rows(x)),
            v=lambda z: signal(flat.v(z)),
            ut=flat.ut,
            u=flat.u,
            leading_vt=lambda x, k: flat.leading_vt(rows(x), k),
            leading_v=lambda z, _: signal(flat.leading_v(z, None)),
        )
        return self._svd


class PerProblem(Operator):
    r"""One operator per problem of a plate: :math:`A_b` acts on problem ``b``'s signal.

    ``(*batch, B, *in_shape) -> (*batch, B, *out_shape)``: the last batch dim is the plate's
    (``pyro.plate(..., B)`` with the default ``dim=-1``), and operator ``b`` is applied to its
    slice ``b``, e.g. a different inpainting mask per image. Every operator must have the same
    input and output shapes (masks with the same number of observed pixels). When all are linear
    the result is a :class:`LinearPerProblem` (adjoint per problem; no SVD). When all are
    :class:`~diffpost.models.operators.Diagonal` (e.g. zero-filled masks of different sizes) it is
    applied as one vectorised product instead of a loop over the problems.

    Args:
        operators: ``B`` operators, in the plate's order.

    Raises:
        ValueError: no operator, a non-operator, or different shapes; at call time, a tensor
            whose last batch dim is not of size ``B``.
    """

    def __new__(cls, operators: Sequence[Operator] = ()):
        operators = list(operators)
        linear = bool(operators) and all(getattr(op, "is_linear", False) for op in operators)
        return super().__new__(LinearPerProblem if cls is PerProblem and linear else cls)

    def __init__(self, operators: Sequence[Operator]):
        operators = list(operators)
        if not operators:
            raise ValueError("PerProblem needs one operator per problem; got none")
        for index, operator in enumerate(operators):
            if not isinstance(operator, Operator):
                raise ValueError(
                    f"PerProblem: operator {index} must be an Operator; got "
                    f"{type(operator).__name__}"
                )
            shapes = (tuple(operator.in_shape), tuple(operator.out_shape))
            first = (tuple(operators[0].in_shape), tuple(operators[0].out_shape))
            if shapes != first:
                raise ValueError(
                    f"PerProblem: operator {index} maps {shapes[0]} -> {shapes[1]}, operator 0 "
                    f"{first[0]} -> {first[1]}; every problem's operator needs the same shapes "
                    "(e.g. masks with the same number of observed pixels)"
                )
        self.operators = tuple(operators)
        self._diagonal = None  # (B, *in_shape) gains when every operator is a Diagonal
        if all(isinstance(operator, Diagonal) for operator in operators):
            self._diagonal = torch.stack([operator.weights for operator in operators])
        super().__init__(tuple(operators[0].in_shape), tuple(operators[0].out_shape))

    @property
    def num_problems(self) -> int:
        return len(self.operators)

    @property
    def gains(self) -> Tensor | None:
        """``(B, *in_shape)``: the gains of the problems' operators when every one is a
        :class:`~diffpost.models.operators.Diagonal` (applied as one product), else ``None``."""
        return self._diagonal

    def _per_problem(self, name: str, value: Tensor, shape_in, shape_out, what: str) -> Tensor:
        batch = self._check(value, shape_in, what)
        if not batch or batch[-1] != self.num_problems:
            raise ValueError(
                f"PerProblem.{what}: the last batch dim must be the plate's, of size "
                f"{self.num_problems}; got shape {tuple(value.shape)} for event "
                f"{tuple(shape_in)}"
            )
        dim = len(batch) - 1
        if self._diagonal is not None:  # forward and adjoint are the same product
            return value * self._diagonal.to(value)
        parts = [
            getattr(operator, name)(value.select(dim, b))
            for b, operator in enumerate(self.operators)
        ]
        return torch.stack(parts, dim=dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(*batch, B, *in_shape) -> (*batch, B, *out_shape)``."""
        return self._per_problem("forward", x, self.in_shape, self.out_shape, "forward")

    __call__ = forward

    def _forward(self, x: Tensor) -> Tensor:  # rows ordered (..., B): the plate's dim fastest
        return self.forward(x.reshape(-1, self.num_problems, *self.in_shape)).reshape(
            x.shape[0], *self.out_shape
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_problems} operators: {self.operators[0]!r}, ...)"


class LinearPerProblem(PerProblem, LinearOperator):
    """Linear operators, one per problem (what ``PerProblem`` returns for them)."""

    def adjoint(self, y: Tensor) -> Tensor:
        """``(*batch, B, *out_shape) -> (*batch, B, *in_shape)``."""
        return self._per_problem("adjoint", y, self.out_shape, self.in_shape, "adjoint")

    def _adjoint(self, y: Tensor) -> Tensor:
        return self.adjoint(y.reshape(-1, self.num_problems, *self.out_shape)).reshape(
            y.shape[0], *self.in_shape
        )

    def norm(self) -> float:
        """The largest of the problems' spectral norms."""
        return max(operator.norm() for operator in self.operators)

    def matrix(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        raise ValueError(
            "a PerProblem operator has one matrix per problem: use .operators[b].matrix()"
        )
