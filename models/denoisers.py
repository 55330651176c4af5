r"""The denoiser contract and adapters from every common network parametrisation.

The library speaks one language: a denoiser is a callable

.. math:: D(x_t, t) = \mathbb{E}[x_0 \mid x_t] \qquad\text{(the Tweedie mean)},

with ``x_t`` of shape ``(N, *event)`` and ``t`` a float or a tensor of shape ``()`` or ``(N,)``,
attached to the :class:`~diffpost.models.schedules.Schedule` under which ``x_t = alpha(t) x_0 +
sigma(t) eps``. The noise prediction, the score and the probability-flow velocity are derived from
it in exactly one place (:func:`epsilon_from_x0`, :func:`score_from_x0`, :func:`velocity_from_x0`),
and every adapter converts a network *to* this contract:

=============================  ============================================================
adapter                        the wrapped network predicts
=============================  ============================================================
:class:`EpsilonDenoiser`       the noise :math:`\epsilon` (DDPM, DDIM, score SDE VP nets)
:class:`X0Denoiser`            the clean signal :math:`x_0`
:class:`VDenoiser`             :math:`v = \alpha\epsilon - \sigma x_0` (Salimans & Ho 2022)
:class:`ScoreDenoiser`         the score :math:`\nabla \log p_t(x_t)` (NCSN, score SDE)
:class:`VelocityDenoiser`      the flow velocity :math:`\dot\alpha x_0 + \dot\sigma \epsilon`
:class:`DiscreteDDPMDenoiser`  :math:`\epsilon` (or :math:`x_0`, :math:`v`) at integer steps
:class:`EDMDenoiser`           the raw :math:`F_\theta` of Karras et al.'s preconditioning
:class:`DiffusersDenoiser`     a diffusers ``UNet2DModel`` with its DDPM/DDIM scheduler
=============================  ============================================================

:func:`from_network` picks the adapter by name, and :class:`ConvertedDenoiser` queries any
denoiser under another schedule (exactly, through the signal-to-noise ratio). Network adapters
also say what their network should output (``network_target``), which is what
:func:`diffpost.models.training.train` regresses on.

All formulas follow from :math:`x_t = \alpha x_0 + \sigma \epsilon` and Tweedie's identity
:math:`\nabla \log p_t(x_t) = (\alpha\, \mathbb{E}[x_0 \mid x_t] - x_t) / \sigma^2`.

References:
    Efron. Tweedie's formula and selection bias. JASA 2011.
    Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. arXiv:2006.11239.
    Salimans, Ho. Progressive Distillation for Fast Sampling of Diffusion Models. ICLR 2022.
    arXiv:2202.00512.
    Song et al. Score-Based Generative Modeling through SDEs. ICLR 2021. arXiv:2011.13456.
    Lipman et al. Flow Matching for Generative Modeling. ICLR 2023. arXiv:2210.02747.
    Karras et al. Elucidating the Design Space of Diffusion-Based Generative Models. NeurIPS 2022.
    Kingma, Salimans, Poole, Ho. Variational Diffusion Models. NeurIPS 2021. arXiv:2107.00630.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffpost.models.schedules import EDM, DiscreteVP, Schedule

__all__ = [
    "Denoiser",
    "EpsilonDenoiser",
    "X0Denoiser",
    "VDenoiser",
    "ScoreDenoiser",
    "VelocityDenoiser",
    "DiscreteDDPMDenoiser",
    "EDMDenoiser",
    "DiffusersDenoiser",
    "ConvertedDenoiser",
    "ADAPTERS",
    "from_network",
    "broadcast_time",
    "epsilon_from_x0",
    "score_from_x0",
    "velocity_from_x0",
]

Network = Callable[[Tensor, Tensor], Tensor]


def broadcast_time(t: float | Tensor, x: Tensor) -> Tensor:
    """Times as a tensor of shape ``(N,)`` on ``x``'s device and dtype.

    Args:
        t: a float, a 0-d tensor or a tensor of shape ``(N,)``.
        x: a batch of shape ``(N, *event)``.

    Returns:
        Shape ``(N,)``.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},); got {tuple(t.shape)}")
    return t


def _per_sample(value: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``(N,)`` coefficient to broadcast against ``x`` of shape ``(N, *event)``."""
    return value.reshape(value.shape + (1,) * (x.dim() - 1))


def _evaluate(function: Callable[[Tensor], Tensor], t: float | Tensor, x: Tensor) -> Tensor:
    """``function(t)`` as a 0-d tensor for a scalar ``t`` (computed once), else ``(N, 1, ...)``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return function(t)
    return _per_sample(function(broadcast_time(t, x)), x)


def _coefficients(schedule: Schedule, t: float | Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    return _evaluate(schedule.alpha, t, x), _evaluate(schedule.sigma, t, x)


def epsilon_from_x0(schedule: Schedule, x_t: Tensor, x0: Tensor, t: float | Tensor) -> Tensor:
    r""":math:`\hat\epsilon = (x_t - \alpha(t)\, \hat x_0) / \sigma(t)`, shape ``(N, *event)``."""
    alpha, sigma = _coefficients(schedule, t, x_t)
    return torch.addcmul(x_t, x0, alpha, value=-1).div_(sigma)


def score_from_x0(schedule: Schedule, x_t: Tensor, x0: Tensor, t: float | Tensor) -> Tensor:
    r""":math:`\nabla \log p_t(x_t) = (\alpha(t)\, \hat x_0 - x_t) / \sigma(t)^2` (Tweedie)."""
    alpha, sigma = _coefficients(schedule, t, x_t)
    return (alpha * x0 - x_t) / sigma**2


def velocity_from_x0(schedule: Schedule, x_t: Tensor, x0: Tensor, t: float | Tensor) -> Tensor:
    r"""Probability-flow ODE velocity :math:`dx_t/dt = \dot\alpha\, \hat x_0 + \dot\sigma\,
    \hat\epsilon`.

    This is the ODE whose marginals match the diffusion's (Song et al. 2021, eq. 13, written in
    the :math:`(\alpha, \sigma)` parametrisation of Karras et al. 2022, eq. 4).
    """
    alpha_dot = _evaluate(schedule.alpha_derivative, t, x_t)
    sigma_dot = _evaluate(schedule.sigma_derivative, t, x_t)
    return alpha_dot * x0 + sigma_dot * epsilon_from_x0(schedule, x_t, x0, t)


class Denoiser(nn.Module):
    r"""Base class: ``denoiser(x_t, t) -> E[x_0 | x_t]``, with the schedule it is defined under.

    Subclasses implement :meth:`forward`. The derived quantities are methods so that every engine
    gets them from the same formulas.

    Args:
        schedule: the noise schedule of ``x_t``.

    Attributes:
        event_shape: the signal shape the network was trained on, when known (the zoo and
            :func:`~diffpost.models.training.train` set it); a
            :class:`~diffpost.models.priors.DiffusionPrior` of another shape is refused. ``None``
            (the default): not declared, and the prior's construction only checks that one call
            on its shape works.
    """

    event_shape: tuple[int, ...] | None = None

    def __init__(self, schedule: Schedule):
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a models.schedules.Schedule; got {schedule!r}")
        self.schedule = schedule

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:  # pragma: no cover - abstract
        """Tweedie mean, shape ``(N, *event)``."""
        raise NotImplementedError

    def epsilon(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Noise prediction, shape ``(N, *event)``."""
        return epsilon_from_x0(self.schedule, x_t, self(x_t, t), t)

    def score(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Score of the diffused marginal, shape ``(N, *event)``."""
        return score_from_x0(self.schedule, x_t, self(x_t, t), t)

    def velocity(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Probability-flow velocity, shape ``(N, *event)``."""
        return velocity_from_x0(self.schedule, x_t, self(x_t, t), t)


class _NetworkDenoiser(Denoiser):
    """A denoiser built from a network ``net(x_t, t) -> prediction``; ``t`` reaches it as ``(N,)``.

    ``time_scale`` multiplies ``t`` before the call, for networks trained on ``t * 1000`` (say).
    Subclasses say what the network predicts through :meth:`network_target`, which is also what
    :func:`diffpost.models.training.train` regresses the network on.
    """

    def __init__(self, net: Network, schedule: Schedule, time_scale: float = 1.0):
        super().__init__(schedule)
        if not callable(net):
            raise ValueError(f"net must be callable as net(x_t, t); got {net!r}")
        self.net = net
        self.time_scale = time_scale

    def network_output(
        self, x_t: Tensor, t: float | Tensor, condition: Tensor | None = None
    ) -> Tensor:
        """The raw prediction of the network, shape ``(N, *event)``; ``condition`` (per-example,
        not noised; see ``train``'s ``conditions``) is passed on as ``net(x_t, t, condition)``."""
        t = broadcast_time(t, x_t)
        if condition is None:
            prediction = self.net(x_t, t * self.time_scale)
        else:
            prediction = self.net(x_t, t * self.time_scale, condition)
        if prediction.shape != x_t.shape:
            raise ValueError(
                f"{type(self).__name__}: the network returned shape {tuple(prediction.shape)} "
                f"for an input of shape {tuple(x_t.shape)}"
            )
        return prediction

    def network_target(self, x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
        r"""What the network should output at :math:`x_t = \alpha x_0 + \sigma\,` ``noise``."""
        raise NotImplementedError  # pragma: no cover - every adapter below implements it

    def loss_weight(self, x0: Tensor, t: float | Tensor) -> Tensor:
        """Weight of the squared error on the network's output in the training loss (1)."""
        return torch.ones((), dtype=x0.dtype, device=x0.device)


class EpsilonDenoiser(_NetworkDenoiser):
    r"""From a noise predictor: :math:`\hat x_0 = (x_t - \sigma \hat\epsilon) / \alpha`.

    Args:
        net: ``net(x_t, t) -> eps``, shapes ``(N, *event), (N,) -> (N, *event)``.
        schedule: the schedule the network was trained under.
        time_scale: factor applied to ``t`` before calling ``net``.
    """

    def forward(self, x_t: Tensor, t: float | Tensor, condition: Tensor | None = None) -> Tensor:
        alpha, sigma = _coefficients(self.schedule, t, x_t)
        return (x_t - sigma * self.network_output(x_t, t, condition)) / alpha

    def network_target(self, x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
        return noise


class X0Denoiser(_NetworkDenoiser):
    """From a network that predicts :math:`x_0` directly (the contract itself).

    An EDM-preconditioned network that already includes its preconditioning (the official
    ``EDMPrecond(x, sigma)``) is an x0 predictor of the noise level :math:`\\sigma`: wrap it as
    ``X0Denoiser(net, EDM(sigma_max), time_scale=sigma_max)``, since :math:`\\sigma =
    \\sigma_{\\max} t`.
    """

    def forward(self, x_t: Tensor, t: float | Tensor, condition: Tensor | None = None) -> Tensor:
        return self.network_output(x_t, t, condition)

    def network_target(self, x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
        return x0


class VDenoiser(_NetworkDenoiser):
    r"""From a v-prediction network (Salimans & Ho 2022), :math:`v = \alpha\epsilon - \sigma x_0`.

    With :math:`x_t = \alpha x_0 + \sigma\epsilon`:
    :math:`\hat x_0 = (\alpha x_t - \sigma v) / (\alpha^2 + \sigma^2)` (the denominator is 1 on VP).
    """

    def forward(self, x_t: Tensor, t: float | Tensor, condition: Tensor | None = None) -> Tensor:
        alpha, sigma = _coefficients(self.schedule, t, x_t)
        return (alpha * x_t - sigma * self.network_output(x_t, t, condition)) / (
            alpha**2 + sigma**2
        )

    def network_target(self, x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
        alpha, sigma = _coefficients(self.schedule, t, x0)
        return alpha * noise - sigma * x0


class ScoreDenoiser(_NetworkDenoiser):
    r"""From a score network: :math:`\hat x_0 = (x_t + \sigma^2 s_\theta(x_t, t)) / \alpha`.

    Trained by denoising score matching (Vincent 2011) on the target :math:`-\epsilon / \sigma`
    with the weight :math:`\lambda = \sigma^2` of Song et al. (2021, eq. 7).
    """

    def forward(self, x_t: Tensor, t: float | Tensor, condition: Tensor | None = None) -> Tensor:
        alpha, sigma = _coefficients(self.schedule, t, x_t)
        return (x_t + sigma**2 * self.network_output(x_t, t, condition)) / alpha

    def network_target(self, x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
        return -noise / _evaluate(self.schedule.sigma, t, x0)

    def loss_weight(self, x0: Tensor, t: float | Tensor) -> Tensor:
        return _evaluate(self.schedule.sigma, t, x0) ** 2


class VelocityDenoiser(_NetworkDenoiser):
    r"""From a flow-matching velocity network :math:`u = \dot\alpha x_0 + \dot\sigma \epsilon`.

    Solving :math:`x_t = \alpha x_0 + \sigma\epsilon` and :math:`u` for :math:`x_0`:
    :math:`\hat x_0 = (\dot\sigma x_t - \sigma u) / (\dot\sigma\alpha - \sigma\dot\alpha)`; for
    rectified flow (:math:`\alpha = 1 - t, \sigma = t`) this is :math:`x_t - t\,u`, and the
    training target is the conditional velocity :math:`\epsilon - x_0` (Lipman et al. 2023).
    """

    def forward(self, x_t: Tensor, t: float | Tensor, condition: Tensor | None = None) -> Tensor:
        alpha, sigma = _coefficients(self.schedule, t, x_t)
        alpha_dot = _evaluate(self.schedule.alpha_derivative, t, x_t)
        sigma_dot = _evaluate(self.schedule.sigma_derivative, t, x_t)
        velocity = self.network_output(x_t, t, condition)
        return (sigma_dot * x_t - sigma * velocity) / (sigma_dot * alpha - sigma * alpha_dot)

    def network_target(self, x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
        alpha_dot = _evaluate(self.schedule.alpha_derivative, t, x0)
        sigma_dot = _evaluate(self.schedule.sigma_derivative, t, x0)
        return alpha_dot * x0 + sigma_dot * noise


class EDMDenoiser(_NetworkDenoiser):
    r"""From a raw network :math:`F_\theta` with the preconditioning of Karras et al. (2022, Table
    1).

    On the variance-exploding scale :math:`\tilde x = x_t / \alpha` with noise level
    :math:`\tilde\sigma = \sigma / \alpha` (the schedule's noise ratio; :math:`\tilde x = x_t` on
    :class:`~diffpost.models.schedules.EDM` and :class:`~diffpost.models.schedules.VE`):

    .. math:: D(\tilde x; \tilde\sigma) = c_\text{skip} \tilde x
              + c_\text{out} F_\theta(c_\text{in} \tilde x;\ c_\text{noise}),

    :math:`c_\text{skip} = \sigma_d^2 / (\tilde\sigma^2 + \sigma_d^2)`,
    :math:`c_\text{out} = \tilde\sigma \sigma_d / \sqrt{\tilde\sigma^2 + \sigma_d^2}`,
    :math:`c_\text{in} = 1 / \sqrt{\tilde\sigma^2 + \sigma_d^2}`,
    :math:`c_\text{noise} = \tfrac14 \ln \tilde\sigma`. The network receives
    ``c_noise * time_scale`` as its time input. Training regresses :math:`F_\theta` on :math:`(x_0 -
    c_\text{skip} \tilde x) / c_\text{out}` with unit weight, which is the paper's loss
    :math:`\lambda \lVert D - x_0 \rVert^2` with :math:`\lambda = 1 / c_\text{out}^2` (their eq. 8
    and Table 1).

    Args:
        net: the raw network :math:`F_\theta(x, c_\text{noise})`.
        schedule: the schedule of ``x_t`` (default :class:`~diffpost.models.schedules.EDM`); any
            schedule works through its noise ratio.
        sigma_data: :math:`\sigma_d`, the data's standard deviation (0.5 in the paper).
        time_scale: factor applied to :math:`c_\text{noise}` before calling ``net``.
    """

    def __init__(
        self,
        net: Network,
        schedule: Schedule | None = None,
        sigma_data: float = 0.5,
        time_scale: float = 1.0,
    ):
        super().__init__(net, EDM() if schedule is None else schedule, time_scale)
        if not sigma_data > 0:
            raise ValueError(f"EDMDenoiser needs sigma_data > 0; got {sigma_data}")
        self.sigma_data = sigma_data

    def _preconditioning(self, x: Tensor, t: float | Tensor) -> tuple[Tensor, ...]:
        alpha, sigma = _coefficients(self.schedule, t, x)
        noise = sigma / alpha
        scale = torch.sqrt(noise**2 + self.sigma_data**2)
        c_skip = self.sigma_data**2 / scale**2
        c_out = noise * self.sigma_data / scale
        c_in = 1.0 / scale
        return alpha, c_skip, c_out, c_in, torch.log(noise) / 4

    def network_output(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        alpha, _, _, c_in, c_noise = self._preconditioning(x_t, t)
        c_noise = broadcast_time(c_noise.flatten() if c_noise.dim() else c_noise, x_t)
        prediction = self.net(c_in * x_t / alpha, c_noise * self.time_scale)
        if prediction.shape != x_t.shape:
            raise ValueError(
                f"EDMDenoiser: the network returned shape {tuple(prediction.shape)} "
                f"for an input of shape {tuple(x_t.shape)}"
            )
        return prediction

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        alpha, c_skip, c_out, _, _ = self._preconditioning(x_t, t)
        return c_skip * x_t / alpha + c_out * self.network_output(x_t, t)

    def network_target(self, x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
        alpha, c_skip, c_out, _, _ = self._preconditioning(x0, t)
        _, sigma = _coefficients(self.schedule, t, x0)
        noisy = x0 + sigma / alpha * noise
        return (x0 - c_skip * noisy) / c_out


class DiscreteDDPMDenoiser(Denoiser):
    r"""From a discrete-time DDPM network ``net(x, n)`` with integer steps ``n = 0..N-1``.

    The network's step ``n`` (diffusers' 0-based convention, noise level
    ``alphas_cumprod[n]``) sits at continuous time :math:`t = (n + 1) / N` of the
    :class:`~diffpost.models.schedules.DiscreteVP` schedule, so the library only ever sees
    continuous ``t``. Off the grid, the nearest step is used and the conversion to :math:`x_0` uses
    the schedule at the queried ``t`` (exact on the grid, which is where the DDPM/DDIM time grids
    fall).

    Args:
        net: ``net(x_t, n) -> prediction`` with ``n`` a ``long`` tensor of shape ``(N,)``.
        alphas_cumprod: shape ``(N_train,)``, as in a diffusers scheduler.
        prediction: ``"epsilon"``, ``"sample"`` (x0) or ``"v_prediction"`` (diffusers' names).
    """

    def __init__(self, net: Network, alphas_cumprod: Tensor, prediction: str = "epsilon"):
        super().__init__(DiscreteVP(alphas_cumprod))
        if prediction not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(
                f"prediction must be 'epsilon', 'sample' or 'v_prediction'; got {prediction!r}"
            )
        if not callable(net):
            raise ValueError(f"net must be callable as net(x_t, n); got {net!r}")
        self.net = net
        self.prediction = prediction

    def step_index(self, t: Tensor) -> Tensor:
        """Nearest training step ``n = round(t N) - 1`` clamped to ``[0, N - 1]``, long ``(N,)``."""
        steps = self.schedule.num_train_steps
        return (torch.round(t * steps) - 1).clamp(0, steps - 1).long()

    def network_output(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """The raw prediction of the network at the nearest step, shape ``(N, *event)``."""
        prediction = self.net(x_t, self.step_index(broadcast_time(t, x_t)))
        if prediction.shape != x_t.shape:
            raise ValueError(
                f"{type(self).__name__}: the network returned shape {tuple(prediction.shape)} "
                f"for an input of shape {tuple(x_t.shape)}"
            )
        return prediction

    def network_target(self, x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
        r"""What the network should output at :math:`x_t = \alpha x_0 + \sigma\,` ``noise``."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "v_prediction":
            alpha, sigma = _coefficients(self.schedule, t, x0)
            return alpha * noise - sigma * x0
        return x0

    def loss_weight(self, x0: Tensor, t: float | Tensor) -> Tensor:
        """Weight of the squared error on the network's output in the training loss (1)."""
        return torch.ones((), dtype=x0.dtype, device=x0.device)

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        prediction = self.network_output(x_t, t)
        alpha, sigma = _coefficients(self.schedule, t, x_t)
        if self.prediction == "epsilon":
            return (x_t - sigma * prediction) / alpha
        if self.prediction == "v_prediction":
            return alpha * x_t - sigma * prediction
        return prediction


class _DiffusersNetwork(nn.Module):
    """``(x, n) -> unet(x, n).sample`` for a diffusers ``UNet2DModel`` (registered as a module)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, steps: Tensor) -> Tensor:
        return self.unet(x, steps, return_dict=False)[0]


class DiffusersDenoiser(DiscreteDDPMDenoiser):
    r"""A diffusers ``UNet2DModel`` with the configuration of its DDPM/DDIM scheduler.

    The scheduler supplies :math:`\bar\alpha_n` (``scheduler.alphas_cumprod``, as diffusers
    computes it, so the noise levels match the training run exactly) and the prediction type
    (``"epsilon"``, ``"sample"`` or ``"v_prediction"``); the network is then a
    :class:`DiscreteDDPMDenoiser`. Nothing is fetched from a hub: pass the objects, or a local
    folder to :meth:`from_pretrained`.

    The Tweedie mean is returned as predicted: diffusers' schedulers clip their :math:`\hat x_0`
    to ``[-1, 1]`` inside their own sampling step (``clip_sample``), which is a sampler choice,
    not part of the denoiser.

    Args:
        unet: a ``diffusers.UNet2DModel`` (any module called as ``unet(x, n, return_dict=False)``).
        scheduler: a ``DDPMScheduler`` or ``DDIMScheduler`` (anything with ``alphas_cumprod`` and
            ``config.prediction_type``).

    References:
        von Platen et al. Diffusers: State-of-the-art diffusion models.
        https://github.com/huggingface/diffusers
    """

    def __init__(self, unet: nn.Module, scheduler):
        if not isinstance(unet, nn.Module):
            raise ValueError(f"unet must be a torch.nn.Module; got {type(unet).__name__}")
        if not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "config"):
            raise ValueError(
                "scheduler must be a diffusers scheduler with alphas_cumprod and a config "
                f"(DDPMScheduler, DDIMScheduler); got {type(scheduler).__name__}"
            )
        alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod).detach().double().cpu()
        prediction = scheduler.config.get("prediction_type", "epsilon")
        super().__init__(_DiffusersNetwork(unet), alphas_cumprod, prediction)

    @classmethod
    def from_pretrained(cls, path, scheduler: str = "ddpm") -> DiffusersDenoiser:
        """Load a UNet and its scheduler configuration from a local folder (never a hub).

        Args:
            path: a saved pipeline (subfolders ``unet/`` and ``scheduler/``, as written by
                ``DDPMPipeline.save_pretrained``) or a saved ``UNet2DModel`` folder that also holds
                the scheduler's ``scheduler_config.json``.
            scheduler: ``"ddpm"`` or ``"ddim"``, the class that reads the configuration (both
                give the same noise levels).

        Raises:
            ValueError: if the folder or its parts do not exist, or for an unknown scheduler.
            ImportError: if diffusers is not installed (``pip install posterior[diffusers]``).
        """
        from pathlib import Path

        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

        classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
        if scheduler not in classes:
            raise ValueError(f"scheduler must be 'ddpm' or 'ddim'; got {scheduler!r}")
        root = Path(path)
        pipeline = (root / "unet").is_dir()
        unet_folder = root / "unet" if pipeline else root
        scheduler_folder = root / "scheduler" if pipeline else root
        for folder, name in (
            (unet_folder, "config.json"),
            (scheduler_folder, "scheduler_config.json"),
        ):
            if not (folder / name).is_file():
                raise ValueError(f"no {name} in {folder} (expected a saved diffusers model)")
        unet = UNet2DModel.from_pretrained(unet_folder, local_files_only=True)
        loaded = classes[scheduler].from_pretrained(scheduler_folder, local_files_only=True)
        return cls(unet.eval(), loaded)


class ConvertedDenoiser(Denoiser):
    r"""A denoiser of one schedule queried under another: exact, through the noise ratio.

    For a target schedule :math:`(\alpha, \sigma)` at time ``t`` and the source schedule
    :math:`(\alpha', \sigma')` of ``denoiser``, let ``s`` solve
    :math:`\sigma'(s)/\alpha'(s) = \sigma(t)/\alpha(t)` (same signal-to-noise ratio). Then
    :math:`x'_s = (\alpha'(s)/\alpha(t))\, x_t` has exactly the law of the source's noised
    data at ``s`` given :math:`x_0`, so

    .. math:: \mathbb E[x_0 \mid x_t] = D'\big(\tfrac{\alpha'(s)}{\alpha(t)} x_t,\ s\big)

    (Kingma et al. 2021, section 4: the diffusion loss and the posterior depend on the schedule
    only through the SNR; Karras et al. 2022, eq. 4 for the scaling). This is exact wherever the
    target's noise ratio lies within the source's range ``[ratio'(0), ratio'(1)]``; outside it,
    ``s`` is clamped to 0 or 1. ``s`` comes from ``schedule.time_of_noise_ratio`` (closed form for
    EDM and rectified flow, bisection otherwise).

    Args:
        denoiser: the source denoiser (any :class:`Denoiser`).
        schedule: the schedule to query it under.
    """

    def __init__(self, denoiser: Denoiser, schedule: Schedule):
        super().__init__(schedule)
        if not isinstance(denoiser, Denoiser):
            raise ValueError(f"denoiser must be a models.denoisers.Denoiser; got {denoiser!r}")
        self.source = denoiser

    def source_time(self, t: float | Tensor, like: Tensor) -> Tensor:
        """The source time ``s`` with the same noise ratio as ``t``; shape of ``t`` (as a
        tensor)."""
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
        return self.source.schedule.time_of_noise_ratio(self.schedule.noise_ratio(t))

    def forward(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        s = self.source_time(t, x_t)
        scale = _evaluate(self.source.schedule.alpha, s, x_t) / _evaluate(
            self.schedule.alpha, t, x_t
        )
        return self.source(scale * x_t, s)


#: prediction name -> adapter class, for :func:`from_network`.
ADAPTERS: dict[str, type[_NetworkDenoiser]] = {
    "epsilon": EpsilonDenoiser,
    "x0": X0Denoiser,
    "v": VDenoiser,
    "score": ScoreDenoiser,
    "velocity": VelocityDenoiser,
    "edm": EDMDenoiser,
}


def from_network(
    net: Network, schedule: Schedule, prediction: str = "epsilon", time_scale: float = 1.0
) -> Denoiser:
    """Wrap a network by the name of what it predicts under ``schedule``.

    Args:
        net: ``net(x_t, t) -> prediction`` (for ``"edm"``, the raw network of :class:`EDMDenoiser`).
        schedule: the schedule the network was trained under.
        prediction: ``"epsilon"``, ``"x0"``, ``"v"``, ``"score"``, ``"velocity"`` or ``"edm"``.
        time_scale: factor applied to the network's time input.

    Returns:
        The matching adapter of :data:`ADAPTERS`.
    """
    if prediction not in ADAPTERS:
        raise ValueError(f"prediction must be one of {sorted(ADAPTERS)}; got {prediction!r}")
    return ADAPTERS[prediction](net, schedule, time_scale=time_scale)
