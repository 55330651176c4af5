r"""Training diffusion priors: denoising score matching with EMA weights and resumable checkpoints.

:func:`train` fits the network inside any network adapter of :mod:`diffpost.models.denoisers`
(:class:`~diffpost.models.denoisers.EpsilonDenoiser`, :class:`~diffpost.models.denoisers.VDenoiser`,
:class:`~diffpost.models.denoisers.X0Denoiser`, :class:`~diffpost.models.denoisers.ScoreDenoiser`,
:class:`~diffpost.models.denoisers.VelocityDenoiser`,
:class:`~diffpost.models.denoisers.EDMDenoiser`,
:class:`~diffpost.models.denoisers.DiscreteDDPMDenoiser`) to a data tensor, under the adapter's
schedule. One step draws a batch :math:`x_0` from the data (uniformly, with replacement), times
:math:`t \sim \mathcal U[t_{\min}, 1]` (on a :class:`~diffpost.models.schedules.DiscreteVP`
schedule: the grid :math:`t = n/N`, :math:`n \sim \mathcal U\{1..N\}`), noise :math:`\epsilon \sim
    \mathcal N(0, I)`, and minimises

.. math:: \mathcal L(\theta) = \mathbb E\, \lambda(t)\,
          \lVert F_\theta(x_t, t) - F^\star(x_0, \epsilon, t) \rVert^2 / d,
          \qquad x_t = \alpha(t) x_0 + \sigma(t) \epsilon,

where :math:`F^\star` is the adapter's :meth:`network_target` (the noise for eps-prediction,
:math:`\alpha\epsilon - \sigma x_0` for v-prediction, ...) and :math:`\lambda` its
:meth:`loss_weight`: the simple loss of Ho et al. (2020) for eps-prediction, denoising score
matching (Vincent 2011; Song et al. 2021) in every parametrisation, since each target is an
affine function of the score target :math:`-\epsilon/\sigma`.

Optimisation follows the recipe measured for small image priors (reference note
``offline-data.md``; Ho et al. 2020 for the EMA): AdamW, a linear learning-rate warm-up followed
by a cosine decay to 0, gradient clipping, and an exponential moving average of the weights with
decay :math:`\min(\beta, (1 + k)/(10 + k))` at step ``k`` (the warm-up of the EMA used by
TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``, so that short runs are not
dominated by the random initialisation). The EMA network is the one to sample from.

A checkpoint holds the step, the network, the EMA, the optimiser, the learning-rate schedule, the
random generator and the losses; a run given the path of an existing checkpoint continues from
it, and ``KeyboardInterrupt`` saves one before propagating, so an interrupted run resumes without
losing a step. A resumed run is bitwise identical to an uninterrupted one on the same device
(unless the interrupt lands inside the few milliseconds of the optimiser's parameter update,
which may then be half applied).

:func:`fit_gaussian_mixture` fits the exact prior :class:`~diffpost.models.priors.GaussianMixture`
to data by expectation-maximisation.

References:
    Vincent. A Connection Between Score Matching and Denoising Autoencoders. Neural Computation,
    2011.
    Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. arXiv:2006.11239.
    Song et al. Score-Based Generative Modeling through SDEs. ICLR 2021. arXiv:2011.13456.
    Loshchilov, Hutter. Decoupled Weight Decay Regularization (AdamW). ICLR 2019.
    Dempster, Laird, Rubin. Maximum likelihood from incomplete data via the EM algorithm. JRSS B,
    1977. Bishop. Pattern Recognition and Machine Learning, 2006, section 9.2.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from diffpost.models.denoisers import Denoiser
from diffpost.models.priors import GaussianMixture
from diffpost.models.schedules import DiscreteVP, Schedule

__all__ = [
    "TrainingResult",
    "train",
    "denoising_loss",
    "diffused",
    "fit_gaussian_mixture",
    "training_times",
]


class TrainingResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
        denoiser: the EMA weights, in evaluation mode (the one to sample from).
        last: the last iterate of the optimiser, in evaluation mode.
        losses: training loss of every step so far, shape ``(num_steps,)``.
    """

    denoiser: Denoiser
    last: Denoiser
    losses: Tensor


def _validate(denoiser, data, num_steps, batch_size, learning_rate, warmup_steps, ema_decay, t_min):
    if not (hasattr(denoiser, "network_target") and isinstance(denoiser, Denoiser)):
        raise ValueError(
            "train needs a network adapter from models.denoisers (EpsilonDenoiser, VDenoiser, "
            f"X0Denoiser, ScoreDenoiser, VelocityDenoiser, EDMDenoiser, DiscreteDDPMDenoiser); got "
            f"{type(denoiser).__name__}"
        )
    if not any(p.requires_grad for p in denoiser.parameters()):
        raise ValueError("train: the denoiser has no trainable parameters")
    if not isinstance(data, Tensor) or data.dim() < 2 or data.shape[0] < 1:
        raise ValueError("data must be a tensor of shape (num_examples, *event)")
    if not torch.isfinite(data).all():
        raise ValueError("data contains non-finite values")
    for name, value in (("num_steps", num_steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive; got {learning_rate}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer; got {warmup_steps!r}")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1); got {ema_decay}")
    if not 0 < t_min < 1:
        raise ValueError(f"t_min must lie in (0, 1); got {t_min}")


def training_times(schedule: Schedule, n: int, t_min: float, generator, like: Tensor) -> Tensor:
    """Training times, shape ``(n,)``: the grid of a discrete schedule, else uniform on [t_min,
    1]."""
    if isinstance(schedule, DiscreteVP):
        steps = torch.randint(
            1, schedule.num_train_steps + 1, (n,), generator=generator, device=like.device
        )
        return steps.to(like.dtype) / schedule.num_train_steps
    u = torch.rand(n, generator=generator, dtype=like.dtype, device=like.device)
    return t_min + (1.0 - t_min) * u


def _learning_rate_factor(step: int, warmup_steps: int, num_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at ``num_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _save(path: Path, state: dict) -> None:
    """Write atomically: a crash while saving leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def diffused(schedule: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    r""":math:`x_t = \alpha(t)\, x_0 + \sigma(t)\,` ``noise`` for a batch: ``x0`` and ``noise``
    ``(N, *event)``, ``t`` ``(N,)``; what every training objective feeds the network."""
    alpha, sigma = schedule(t)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return alpha.reshape(shape) * x0 + sigma.reshape(shape) * noise


def denoising_loss(
    denoiser: Denoiser,
    x0: Tensor,
    t: Tensor,
    noise: Tensor,
    condition: Tensor | None,
    generator: torch.Generator,
) -> Tensor:
    r"""The default objective of :func:`train`: the adapter's weighted squared error on its
    target at :math:`x_t = \alpha x_0 + \sigma\,` ``noise`` (see the module docstring)."""
    x_t = diffused(denoiser.schedule, x0, t, noise)
    if condition is None:  # adapters without conditioning take (x_t, t) only
        output = denoiser.network_output(x_t, t)
    else:
        output = denoiser.network_output(x_t, t, condition)
    error = output - denoiser.network_target(x0, noise, t)
    return (denoiser.loss_weight(x0, t) * error**2).mean()


def train(
    denoiser: Denoiser,
    data: Tensor,
    *,
    num_steps: int,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    warmup_steps: int = 200,
    weight_decay: float = 0.0,
    gradient_clip: float | None = 1.0,
    ema_decay: float = 0.999,
    t_min: float = 1e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    progress: bool = True,
    conditions: Tensor | None = None,
    loss: Callable[..., Tensor] | None = None,
) -> TrainingResult:
    r"""Train the network of ``denoiser`` on ``data`` by denoising score matching.

    Args:
        denoiser: a network adapter (its ``net`` is trained in place; see the module docstring).
        data: training examples, shape ``(M, *event)``, at the scale the prior should have
            (e.g. images in ``[-1, 1]``); moved to the network's device and dtype.
        num_steps: total number of optimiser steps (a resumed run counts the steps already done).
        batch_size: examples per step.
        learning_rate: peak AdamW learning rate.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW's decoupled weight decay.
        gradient_clip: maximal global gradient norm, or ``None``.
        ema_decay: :math:`\beta` of the weight average.
        t_min: smallest training time (continuous schedules).
        seed: seed of the generator that draws batches, times and noise.
        device: where to train (default: where the network's parameters are).
        checkpoint: file to save to every ``checkpoint_every`` steps, at the end and on
            ``KeyboardInterrupt``; if it exists, training resumes from it.
        checkpoint_every: steps between checkpoints.
        progress: show a ``tqdm`` bar (always off when the ``CI`` environment variable is set).
        conditions: per-example conditioning, shape ``(M, ...)``, given unnoised to the network
            with its example (``denoiser.network_output(x_t, t, conditions[i])``); e.g. the
            positions of the patches of :mod:`diffpost.models.patches`.
        loss: another training objective in place of denoising score matching, called as
            ``loss(denoiser, x0, t, noise, condition, generator) -> scalar`` on each batch (the
            batch's examples, times, noise and conditions, and the run's generator for any
            further randomness), e.g. :class:`~diffpost.models.corrupted.AmbientLoss` for
            masked data; its ``repr`` is part of the checkpoint's settings.

    Returns:
        A :class:`TrainingResult`.

    Raises:
        ValueError: for a denoiser that is not a network adapter, bad data or hyperparameters,
            or a checkpoint written with other hyperparameters.
    """
    _validate(denoiser, data, num_steps, batch_size, learning_rate, warmup_steps, ema_decay, t_min)
    if device is not None:
        denoiser.to(device)
    reference = next(p for p in denoiser.parameters())
    data = data.to(device=reference.device, dtype=reference.dtype)
    if conditions is not None:
        if not isinstance(conditions, Tensor) or conditions.shape[:1] != data.shape[:1]:
            raise ValueError(
                "conditions must be a tensor with one row per example of data, shape "
                f"({data.shape[0]}, ...); got "
                f"{tuple(conditions.shape) if isinstance(conditions, Tensor) else conditions!r}"
            )
        conditions = conditions.to(device=reference.device, dtype=reference.dtype)
    config = {
        "num_steps": num_steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "warmup_steps": warmup_steps,
        "weight_decay": weight_decay,
        "gradient_clip": gradient_clip,
        "ema_decay": ema_decay,
        "t_min": t_min,
        "seed": seed,
        "num_examples": data.shape[0],
    }
    if conditions is not None:
        config["condition_shape"] = tuple(conditions.shape[1:])
    if loss is not None:
        if not callable(loss):
            raise ValueError(f"loss must be callable; got {type(loss).__name__}")
        config["loss"] = repr(loss)
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    parameters = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, warmup_steps, num_steps)
    )
    generator = torch.Generator(device=reference.device).manual_seed(seed)
    losses = torch.zeros(num_steps, dtype=torch.float64)
    step = 0
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        state = torch.load(path, map_location=reference.device, weights_only=True)
        changed = {k: (state["config"].get(k), v) for k, v in config.items()}
        changed = {k: pair for k, pair in changed.items() if pair[0] != pair[1]}
        if changed:
            raise ValueError(
                f"checkpoint {path} was written with other settings (saved, given): {changed}"
            )
        denoiser.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"].cpu())
        step = state["step"]
        losses[:step] = state["losses"][:step]

    def save(generator_state: Tensor) -> None:
        if path is not None:
            _save(
                path,
                {
                    "config": config,
                    "step": step,
                    "model": denoiser.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "generator": generator_state,
                    "losses": losses[:step].clone(),
                },
            )

    from tqdm.auto import tqdm

    bar = tqdm(
        total=num_steps,
        initial=step,
        disable=not progress or bool(os.environ.get("CI")),
        desc="training",
    )
    denoiser.train()
    step_generator_state = generator.get_state()
    try:
        while step < num_steps:
            step_generator_state = generator.get_state()  # an interrupted step is redone
            index = torch.randint(
                0, data.shape[0], (batch_size,), generator=generator, device=data.device
            )
            x0 = data[index]
            t = training_times(denoiser.schedule, batch_size, t_min, generator, x0)
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
            condition = None if conditions is None else conditions[index]
            objective = (loss or denoising_loss)(denoiser, x0, t, noise, condition, generator)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if gradient_clip is not None:
                torch.nn.utils.clip_grad_norm_(parameters, gradient_clip)
            optimizer.step()
            scheduler.step()
            decay = min(ema_decay, (1.0 + step) / (10.0 + step))
            with torch.no_grad():
                for average, current in zip(ema.parameters(), denoiser.parameters(), strict=True):
                    average.lerp_(current, 1.0 - decay)
                for average, current in zip(ema.buffers(), denoiser.buffers(), strict=True):
                    average.copy_(current)
            losses[step] = objective.detach().double()
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{float(losses[step - 50 : step].mean()):.4f}")
            if step % checkpoint_every == 0:
                save(generator.get_state())
    except KeyboardInterrupt:
        save(step_generator_state)
        raise
    finally:
        bar.close()
    save(generator.get_state())
    for trained in (ema, denoiser):  # what a prior built on them must declare
        trained.event_shape = tuple(data.shape[1:])
    return TrainingResult(ema.eval(), denoiser.eval(), losses)


def _kmeans_responsibilities(x: Tensor, components: int, iterations: int, seed: int) -> Tensor:
    """One-hot assignments ``(M, K)`` to the nearest k-means centre (k-means++ seeding)."""
    num = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(0, num, (1,), generator=generator)]
    for _ in range(components - 1):
        distance = torch.cdist(x, centres).min(dim=1).values ** 2
        centres = torch.cat([centres, x[torch.multinomial(distance, 1, generator=generator)]])
    for _ in range(iterations):
        nearest = torch.cdist(x, centres).argmin(dim=1)
        counts = torch.bincount(nearest, minlength=components).to(x)
        sums = torch.zeros_like(centres).index_add_(0, nearest, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    return torch.nn.functional.one_hot(torch.cdist(x, centres).argmin(dim=1), components).to(x)


def _responsibilities(
    x: Tensor, weights: Tensor, means: Tensor, cholesky: Tensor
) -> tuple[Tensor, Tensor]:
    """Component posteriors ``(M, K)`` and log-likelihoods ``(M,)`` of ``x`` ``(M, d)``."""
    dim = x.shape[1]
    centred = x[None] - means[:, None]
    solved = torch.linalg.solve_triangular(cholesky, centred.transpose(1, 2), upper=False)
    log_det = 2 * torch.log(torch.diagonal(cholesky, dim1=1, dim2=2)).sum(1)
    log_density = -0.5 * ((solved**2).sum(1) + log_det[:, None] + dim * math.log(2 * math.pi))
    joint = log_density.T + torch.log(weights)
    log_likelihood = torch.logsumexp(joint, dim=1)
    return torch.exp(joint - log_likelihood[:, None]), log_likelihood


def fit_gaussian_mixture(
    data: Tensor,
    components: int,
    *,
    schedule: Schedule | None = None,
    regularisation: float = 1e-2,
    iterations: int = 200,
    kmeans_iterations: int = 20,
    tolerance: float = 1e-8,
    seed: int = 0,
    initial: GaussianMixture | None = None,
) -> GaussianMixture:
    r"""Maximum-likelihood Gaussian mixture (full covariances) by EM, as an exact prior.

    Initialisation as scikit-learn's default: k-means (Lloyd's iterations from a k-means++
    seeding, Arthur & Vassilvitskii 2007, with a generator seeded by ``seed``), then hard
    assignments to the nearest centre; or, given ``initial``, the responsibilities of that
    mixture (a warm start, as the M-steps of :mod:`diffpost.models.corrupted` use). Each M-step adds
    ``regularisation * I`` to every covariance (as scikit-learn's ``reg_covar``), which keeps
    them positive definite for image data with constant pixels. Computed in float64.

    Args:
        data: shape ``(M, *event)``.
        components: number of components ``K`` (at most ``M``).
        schedule: schedule of the returned prior (default VP).
        regularisation: added to the covariances' diagonal.
        iterations: maximal number of EM iterations.
        kmeans_iterations: Lloyd iterations of the initialisation.
        tolerance: stop when the mean log-likelihood improves by less than this.
        seed: seed of the initialisation.
        initial: a mixture of ``components`` components on the data's dimension to start from
            (``seed`` and ``kmeans_iterations`` are then unused).

    Returns:
        A :class:`~diffpost.models.priors.GaussianMixture` with ``event_shape = data.shape[1:]``, in
        the data's dtype and device.
    """
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ValueError(f"components must be a positive integer; got {components!r}")
    if data.dim() < 2 or data.shape[0] < components:
        raise ValueError(
            f"data must have shape (M, *event) with M >= components ({components}); "
            f"got {tuple(data.shape)}"
        )
    if not regularisation > 0:
        raise ValueError(f"regularisation must be positive; got {regularisation}")
    x = data.reshape(data.shape[0], -1).to(torch.float64).cpu()
    num, dim = x.shape
    if initial is not None:
        if not isinstance(initial, GaussianMixture) or tuple(initial.means.shape) != (
            components,
            dim,
        ):
            raise ValueError(
                f"initial must be a GaussianMixture of {components} components in dimension "
                f"{dim}; got {type(initial).__name__}"
                + (f" with means {tuple(initial.means.shape)}" if hasattr(initial, "means") else "")
            )
        responsibilities = _responsibilities(
            x,
            initial.weights.to(x),
            initial.means.to(x),
            torch.linalg.cholesky(initial.covariances.to(x)),
        )[0]
    else:
        responsibilities = _kmeans_responsibilities(x, components, kmeans_iterations, seed)
    identity = torch.eye(dim, dtype=x.dtype)
    previous = -math.inf
    for _ in range(iterations):
        counts = responsibilities.sum(0) + 10 * torch.finfo(x.dtype).eps
        weights = counts / num
        means = responsibilities.T @ x / counts[:, None]
        centred = x[None] - means[:, None]
        covariances = (
            torch.einsum("kn,kni,knj->kij", responsibilities.T, centred, centred)
            / counts[:, None, None]
            + regularisation * identity
        )
        responsibilities, log_likelihood = _responsibilities(
            x, weights, means, torch.linalg.cholesky(covariances)
        )
        mean_log_likelihood = float(log_likelihood.mean())
        if mean_log_likelihood - previous < tolerance:
            break
        previous = mean_log_likelihood
    return GaussianMixture(
        weights.to(data),
        means.to(data),
        covariances.to(data),
        schedule,
        event_shape=tuple(data.shape[1:]),
    )
