r"""Tests for the adapters added for learned priors: schedule conversion, EDM preconditioning,
training targets, the adapter factory and diffusers models.

Exact references: a Gaussian mixture has an exact Tweedie denoiser under every schedule
(:class:`diffpost.models.priors.GaussianMixtureDenoiser`), so a denoiser built for one schedule and
queried under another through :class:`ConvertedDenoiser` must return the target schedule's exact x0
estimate. float64 throughout where a closed form is compared.
"""

from __future__ import annotations

import pytest
import torch
from helpers import all_schedules

from diffpost.models.denoisers import (
    ADAPTERS,
    ConvertedDenoiser,
    DiscreteDDPMDenoiser,
    EDMDenoiser,
    VDenoiser,
    from_network,
)
from diffpost.models.networks import UNet
from diffpost.models.priors import GaussianMixture
from diffpost.models.schedules import EDM, VP, DiscreteVP

F64 = torch.float64
SCHEDULES = all_schedules()
NAMES = sorted(SCHEDULES)
# Times whose noise ratios lie inside every schedule's range (VE stops at sigma/alpha = 0.01 and
# 50, EDM at 80 t): the conversion is exact there.
TIMES = torch.tensor([0.1, 0.23, 0.37, 0.5, 0.6], dtype=F64)


def mixture(schedule) -> GaussianMixture:
    generator = torch.Generator().manual_seed(3)
    means = torch.randn(2, 3, generator=generator, dtype=F64)
    factors = torch.randn(2, 3, 3, generator=generator, dtype=F64)
    covariances = factors @ factors.transpose(1, 2) + 0.1 * torch.eye(3, dtype=F64)
    return GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64), means, covariances, schedule)


def noisy_points(schedule, t: torch.Tensor) -> torch.Tensor:
    """x_t drawn from the diffused mixture under ``schedule`` at the times ``t`` (one each)."""
    generator = torch.Generator().manual_seed(5)
    x0 = mixture(schedule).sample((len(t),), generator=generator)
    alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    return alpha * x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=F64)


@pytest.mark.parametrize("source", NAMES)
@pytest.mark.parametrize("target", NAMES)
def test_conversion_between_schedules_is_exact(source, target):
    converted = ConvertedDenoiser(mixture(SCHEDULES[source]).denoiser, SCHEDULES[target])
    exact = mixture(SCHEDULES[target]).denoiser
    x_t = noisy_points(SCHEDULES[target], TIMES)
    torch.testing.assert_close(converted(x_t, TIMES), exact(x_t, TIMES), rtol=1e-9, atol=1e-9)
    # a scalar time gives the same as the same time repeated
    torch.testing.assert_close(
        converted(x_t, 0.37),
        exact(x_t, torch.full((len(x_t),), 0.37, dtype=F64)),
        rtol=1e-9,
        atol=1e-9,
    )


def test_conversion_of_a_network_round_trips():
    torch.manual_seed(0)
    net = UNet(1, 8, (1, 2)).double()
    with torch.no_grad():  # a non-trivial output (the output layer starts at zero)
        net.conv_out.weight.normal_(0, 0.1)
    original = VDenoiser(net, VP("cosine"))
    round_trip = ConvertedDenoiser(ConvertedDenoiser(original, EDM()), VP("cosine"))
    x = torch.randn(5, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = TIMES
    torch.testing.assert_close(round_trip(x, t), original(x, t), rtol=1e-9, atol=1e-9)


def test_conversion_rejects_a_non_denoiser():
    with pytest.raises(ValueError, match="Denoiser"):
        ConvertedDenoiser(lambda x, t: x, VP())


@pytest.mark.parametrize("name", NAMES)
def test_edm_preconditioning_recovers_exact_x0(name):
    """F = (D - c_skip x) / c_out of the exact D, wrapped by EDMDenoiser, gives D back."""
    schedule = SCHEDULES[name]
    exact = mixture(schedule).denoiser
    sigma_data = 0.7

    def raw_network(x_in, c_noise):
        noise = torch.exp(4 * c_noise)[:, None]  # sigma / alpha
        scale = torch.sqrt(noise**2 + sigma_data**2)
        x_ve = x_in * scale  # c_in = 1 / scale
        t = schedule.time_of_noise_ratio(noise[:, 0])
        x_t = x_ve * schedule.alpha(t)[:, None]
        c_skip, c_out = sigma_data**2 / scale**2, noise * sigma_data / scale
        return (exact(x_t, t) - c_skip * x_ve) / c_out

    denoiser = EDMDenoiser(raw_network, schedule, sigma_data=sigma_data)
    x_t = noisy_points(schedule, TIMES)
    torch.testing.assert_close(denoiser(x_t, TIMES), exact(x_t, TIMES), rtol=1e-8, atol=1e-8)


def test_edm_default_schedule_and_validation():
    assert isinstance(EDMDenoiser(lambda x, c: x).schedule, EDM)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMDenoiser(lambda x, c: x, sigma_data=0.0)


def adapter_for(prediction: str, schedule, net):
    if prediction.startswith("discrete"):
        return DiscreteDDPMDenoiser(net, schedule.alphas_cumprod, prediction.split(":")[1])
    return from_network(net, schedule, prediction)


# every continuous adapter under every schedule; the discrete ones on their own DiscreteVP
CASES = [(p, n) for p in sorted(ADAPTERS) for n in NAMES] + [
    (f"discrete:{p}", "discrete_linear") for p in ("epsilon", "sample", "v_prediction")
]


@pytest.mark.parametrize("prediction, name", CASES)
def test_network_target_inverts_the_adapter(prediction, name):
    """A network that outputs exactly ``network_target(x0, noise, t)`` makes the adapter return x0.

    This ties the training targets of models.training to the adapters' x0 formulas.
    """
    schedule = SCHEDULES[name]
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 2, 3, generator=generator, dtype=F64)
    noise = torch.randn(5, 2, 3, generator=generator, dtype=F64)
    t = torch.tensor([1, 120, 400, 650, 930], dtype=F64) / 1000  # on the discrete grid
    alpha, sigma = schedule.alpha(t)[:, None, None], schedule.sigma(t)[:, None, None]
    x_t = alpha * x0 + sigma * noise
    holder = {}
    denoiser = adapter_for(prediction, schedule, lambda x, s: holder["target"])
    holder["target"] = denoiser.network_target(x0, noise, t)
    torch.testing.assert_close(denoiser(x_t, t), x0, rtol=1e-8, atol=1e-8)
    assert denoiser.loss_weight(x0, t).shape in ((), (5, 1, 1))


def test_from_network_names_and_errors():
    net = lambda x, t: x  # noqa: E731
    for name, cls in ADAPTERS.items():
        assert type(from_network(net, VP(), name)) is cls
    with pytest.raises(ValueError, match="prediction must be one of"):
        from_network(net, VP(), "noise")


# ---------------------------------------------------------------------------------------------
# diffusers


def tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    ).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing important, but make sure
        unet.conv_out.weight.normal_(0, 0.2)
    return unet


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_diffusers_denoiser_matches_diffusers_x0(prediction):
    """x0 at step n equals the scheduler's own ``pred_original_sample`` (clipping off)."""
    diffusers = pytest.importorskip("diffusers")
    from diffpost.models.denoisers import DiffusersDenoiser

    unet = tiny_unet()
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction,
        clip_sample=False,
    )
    denoiser = DiffusersDenoiser(unet, scheduler)
    assert isinstance(denoiser.schedule, DiscreteVP)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([0, 17, 500, 999])
    with torch.no_grad():
        ours = denoiser(x, (steps + 1) / 1000.0)
        for i, n in enumerate(steps):
            output = unet(x[i : i + 1], n).sample
            reference = scheduler.step(
                output, int(n), x[i : i + 1], generator=torch.Generator().manual_seed(0)
            ).pred_original_sample
            torch.testing.assert_close(ours[i : i + 1], reference, rtol=1e-4, atol=1e-4)


def test_diffusers_from_pretrained_local_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffpost.models.denoisers import DiffusersDenoiser

    unet = tiny_unet()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=200, prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    unet.save_pretrained(tmp_path / "unet_only")
    scheduler.save_pretrained(tmp_path / "unet_only")
    direct = DiffusersDenoiser(unet, scheduler)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.5, 0.95])
    with torch.no_grad():
        expected = direct(x, t)
        for folder, kind in (("pipe", "ddpm"), ("pipe", "ddim"), ("unet_only", "ddpm")):
            loaded = DiffusersDenoiser.from_pretrained(tmp_path / folder, scheduler=kind)
            assert loaded.prediction == "v_prediction"
            assert loaded.schedule.num_train_steps == 200
            torch.testing.assert_close(loaded(x, t), expected)
    with pytest.raises(ValueError, match="config.json"):
        DiffusersDenoiser.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="scheduler must be"):
        DiffusersDenoiser.from_pretrained(tmp_path / "pipe", scheduler="euler")


def test_diffusers_prior_samples_and_validation():
    pytest.importorskip("diffusers")
    import diffusers

    from diffpost.models import DiffusionPrior
    from diffpost.models.denoisers import DiffusersDenoiser

    denoiser = DiffusersDenoiser(tiny_unet(), diffusers.DDPMScheduler())
    prior = DiffusionPrior(denoiser, (1, 8, 8), sampler="ddim", num_steps=3)
    draws = prior.sample((2,), generator=torch.Generator().manual_seed(0))
    assert draws.shape == (2, 1, 8, 8) and torch.isfinite(draws).all()
    with pytest.raises(ValueError, match="torch.nn.Module"):
        DiffusersDenoiser(lambda x, n: x, diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="diffusers scheduler"):
        DiffusersDenoiser(tiny_unet(), object())


def test_unet_shapes_and_validation():
    net = UNet(2, 8, (1, 2, 2))
    out = net(torch.randn(3, 2, 8, 12), torch.rand(3))
    assert out.shape == (3, 2, 8, 12)
    assert out.abs().max() == 0  # zero-initialised output layer
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(3, 2, 6, 6), torch.rand(3))
    with pytest.raises(ValueError, match="channel_multipliers"):
        UNet(1, 8, ())
    with pytest.raises(ValueError, match="positive"):
        UNet(0, 8)
