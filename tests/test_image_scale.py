"""Image-scale priors and problems: the test photographs, the natural-image patch prior, the
256x256 problems of ``problems.image_problem`` and the demo's camera option."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from diffpost import posterior
from diffpost.diagnostics import scores
from diffpost.models import operators, problems, zoo
from diffpost.models.patches import PatchDenoiser
from diffpost.models.priors import DiffusionPrior


def test_test_images_are_256_squares_in_range():
    for name in zoo.PHOTOS:
        image = zoo.photo(name, dtype=torch.float64)
        assert image.shape == (1, 256, 256) and image.dtype == torch.float64
        assert -1.0 <= image.min() < -0.5 and 0.5 < image.max() <= 1.0, name
        assert image.std() > 0.2, name  # not blank
    assert not torch.equal(zoo.photo("camera"), zoo.photo("astronaut"))
    with pytest.raises(ValueError, match="name must be one of"):
        zoo.photo("lena")


def test_the_patch_prior_loads_offline_for_any_image_size():
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        prior = zoo.natural_patches((1, 40, 72))
        seconds.append(time.perf_counter() - start)
    # measured 0.03-0.06 s after the first load (1.1 s with the imports) on the 2-core
    # development machine; the requirement is 1 s
    assert min(seconds) < 1.0
    assert isinstance(prior, DiffusionPrior) and isinstance(prior.denoiser, PatchDenoiser)
    assert tuple(prior.event_shape) == (1, 40, 72)
    assert prior.denoise(torch.zeros(2, 1, 40, 72), 0.5).shape == (2, 1, 40, 72)
    for shape in [(1, 8, 64), (3, 64, 64), (64, 64)]:
        with pytest.raises(ValueError, match="shape must be"):
            zoo.natural_patches(shape)


def test_the_patch_prior_denoises_held_out_photographs_as_recorded():
    """One Tweedie call at sigma = 25/255 on the held-out camera, as in QUALITY.md."""
    recorded = json.loads((zoo.HERE / "quality.json").read_text())["natural_patches"]
    prior = zoo.natural_patches((1, 256, 256), dtype=torch.float64)
    truth = zoo.photo("camera", dtype=torch.float64)
    ratio = 2.0 * 25 / 255
    generator = torch.Generator().manual_seed(0)
    noisy = truth + ratio * torch.randn(truth.shape, generator=generator, dtype=torch.float64)
    t = prior.schedule.time_of_noise_ratio(torch.tensor(ratio, dtype=torch.float64))
    with torch.no_grad():
        denoised = prior.denoise(prior.schedule.alpha(t) * noisy[None], t)[0]
    psnr = scores.psnr(denoised, truth, data_range=2.0)
    # Same seed, grid and weights: identical on the recording machine; 0.05 dB leaves room
    # for float rounding across platforms.
    assert psnr == pytest.approx(recorded["camera/25"]["prior"], abs=0.05)
    # The claim: a prior that never saw these photographs beats the noisy input by far and
    # matches or beats the oracle-tuned total-variation denoiser (QUALITY.md: ahead by 0.3-0.7
    # dB in 8 of 9 cases, 0.03 dB behind on coffee at sigma = 50).
    for key, row in recorded.items():
        assert row["prior"] > row["noisy"] + 5.0, key
        assert row["prior"] > row["tv_oracle"] - 0.1, key
    gains = [row["prior"] - row["tv_oracle"] for row in recorded.values()]
    assert sum(gains) / len(gains) > 0.2


@pytest.mark.parametrize("task", sorted(problems.IMAGE_TASKS))
def test_image_problems_observe_the_truth_with_the_stated_noise(task):
    image = zoo.photo(problems.IMAGE_TASKS[task][0], dtype=torch.float64)
    prior = zoo.natural_patches(dtype=torch.float64)
    problem = problems.image_problem(task, image, prior=prior, seed=3)
    assert problem.metadata["task"] == task and torch.equal(problem.x_true, image)
    assert tuple(problem.y.shape) == tuple(problem.operator.out_shape)
    residual = (problem.y - problem.operator(image)) / problem.sigma
    # The standardised residual has standard deviation 1 up to 1/sqrt(2n) (n >= 4096 here,
    # so below 1.2 %): 5 % is over four standard errors.
    assert residual.std().item() == pytest.approx(1.0, rel=0.05)
    assert abs(residual.mean().item()) < 5 / math.sqrt(residual.numel())
    again = problems.image_problem(task, image, prior=prior, seed=3)
    assert torch.equal(again.y, problem.y)


def test_image_problem_defaults_and_refusals():
    problem = problems.image_problem("inpaint", seed=0)
    assert torch.equal(problem.x_true, zoo.photo("camera"))
    assert isinstance(problem.operator, operators.Mask)
    # 30 % of 65536 pixels observed: the binomial standard deviation is 117 pixels
    assert abs(problem.y.numel() - 0.3 * 65536) < 4 * 117
    assert isinstance(problem.prior.denoiser, PatchDenoiser)
    assert tuple(problem.prior.event_shape) == (1, 256, 256)
    mri = problems.image_problem("mri", prior=problem.prior)
    assert mri.y.shape == (2, 64 * 256)  # 64 of 256 lines, 20 central (as benchmarked)
    lines = torch.fft.fftshift(mri.operator.mask)[:, 0]
    assert bool(lines[118:138].all()) and int(lines.sum()) == 64
    small = problems.image_problem("mri", zoo.photo("brain")[:, 96:160, 96:160])
    assert small.y.shape == (2, 16 * 64)  # a quarter of the lines at any size
    with pytest.raises(ValueError, match="task must be one of"):
        problems.image_problem("dehaze")
    with pytest.raises(ValueError, match="sigma must be positive"):
        problems.image_problem("denoise", sigma=0.0, prior=problem.prior)
    with pytest.raises(ValueError, match=r"image must be a \(1, H, W\)"):
        problems.image_problem("denoise", torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="prior must be a DiffusionPrior of event shape"):
        problems.image_problem("denoise", prior=zoo.natural_patches((1, 64, 64)))
    with pytest.raises(ValueError, match="prior must be a DiffusionPrior of event shape"):
        problems.image_problem("denoise", prior=object())


def test_an_engine_restores_a_crop_better_than_the_measurement_shows():
    """DDRM with the patch prior on a 64x64 crop of the held-out camera, 4x super-resolution."""
    image = zoo.photo("camera")[:, 96:160, 96:160]
    problem = problems.image_problem("super_resolution", image, seed=0)
    result = posterior.sample(
        problem.model,
        posterior.DDRM(num_steps=20),
        num_particles=4,
        seed=0,
        model_kwargs=problem.model_kwargs,
        progress=False,
    )
    draws = result.get_samples()["x"]
    upsampled = problem.operator.adjoint(problem.y) * 16  # each pixel gets its block's mean

    def psnr(estimate):
        return scores.psnr(estimate, image, data_range=2.0)

    assert torch.isfinite(draws).all()
    # Measured over seeds 0-2: the posterior mean 21.70-22.11 dB, block replication of y
    # 20.30-20.31, bicubic interpolation 21.59-21.63, single draws 20.87-21.56. The margin over
    # the measurement (1.40-1.81 dB) is asserted at 0.5; a mean far above the draws' range would
    # mean the draws were not posterior samples of this problem.
    assert psnr(draws.mean(0)) > psnr(upsampled) + 0.5
    assert psnr(draws.mean(0)) < 25.0
