"""Priors learned from corrupted measurements only, on the 8x8 digits.

The 1497 training digits are seen only through measurements, never clean:

- ``masked``: each image keeps a random half of its pixels (a new mask per image), zero-filled
  (``Diagonal(mask)``, as Rozet et al. store them), with noise sigma = 0.02;
- ``noisy``: every pixel observed with noise sigma = 0.3 (the pixel range is [-1, 1]).

For each, three priors of the same family are compared with the one fitted to the clean digits:

- ``gmm`` part: 10-component Gaussian mixtures. EM (``models.corrupted``, Exact E-step,
  ``FitMixture(10)`` warm-started) against the maximum-likelihood mixture of the clean digits
  and a naive fit to the measurements themselves; scored by the mean log-density of the 300
  held-out clean digits and the prior-sample quality of ``scripts/zoo/quality.py``.
- ``network`` part: the zoo's 8x8 UNet (v-prediction, cosine VP). EM as in the paper: a Gaussian
  by EM in closed form first (``--gaussian-rounds`` rounds of ``FitMixture(1)`` with the Exact
  E-step), then ``--rounds`` rounds of MMPS E-steps (its defaults: 64 steps, one CG iteration)
  and ``--steps-per-round`` training steps warm-started; against the naive network trained on
  the measurements for the same total number of steps, and the shipped ``zoo.digits()`` (6000
  steps on the clean digits). Scored by the prior-sample quality (500 samples, DDPM 100 steps)
  and, on 100 held-out digits corrupted the same way, by MMPS posteriors (16 draws): PSNR of the
  posterior mean and the coverage of the 90% intervals.
- ``ambient`` part (masked only): the same UNet with a mask channel trained with Ambient
  Diffusion's loss (``models.corrupted.AmbientLoss``) for the same number of steps, sampled
  through one fixed mask (``AmbientDenoiser``), scored like the networks.
- ``speed`` part: the training cost per step of each objective, interleaved.
- ``unbiased`` part: the same UNet trained on the measurements with GSURE-diffusion's objective
  (``GSURELoss``, both corruptions) and Consistent-Tweedie's (``TweedieLoss``, noisy only, with
  and without its consistency loss), for the same number of steps, scored like the networks.

Run (about an hour on 2 CPU cores; ``--directory`` keeps the EM rounds, so a rerun resumes)::

    .venv/bin/python benchmarks/corrupted_training.py --directory /tmp/corrupted \\
        --output benchmarks/results/corrupted_training.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import sys
import time
from pathlib import Path

import pyro
import torch
from reporting import write_report

from diffpost import posterior
from diffpost.diagnostics.scores import coverage, psnr
from diffpost.models import GaussianObservation, operators, zoo
from diffpost.models.corrupted import (
    AmbientDenoiser,
    AmbientLoss,
    FitMixture,
    GSURELoss,
    Measurements,
    NoiseFloorDenoiser,
    TrainNetwork,
    TweedieLoss,
)
from diffpost.models.denoisers import VDenoiser, X0Denoiser
from diffpost.models.networks import UNet
from diffpost.models.priors import DiffusionPrior, Gaussian
from diffpost.models.schedules import VP
from diffpost.models.training import fit_gaussian_mixture, train

ROOT = Path(__file__).resolve().parents[1]
SIGMA = {"masked": 0.02, "noisy": 0.3}
KEEP = 0.5  # fraction of pixels a mask keeps
#: the header of the network tables, whose rows `_scored_rows` writes
NETWORK_TABLE = [
    "| data | prior | confidence | class entropy | NN distance | near copies "
    "| posterior PSNR (dB) | 90% coverage | time |",
    "|---|---|---|---|---|---|---|---|---|",
]


def _quality():
    spec = importlib.util.spec_from_file_location(
        "quality", ROOT / "scripts" / "zoo" / "quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corrupt(images: torch.Tensor, kind: str, seed: int) -> Measurements:
    """Measurements of ``images`` ``(M, 1, 8, 8)``: a new random mask per image, or noise."""
    generator = torch.Generator().manual_seed(seed)
    sigma = SIGMA[kind]
    if kind == "masked":
        masks = torch.rand(images.shape, generator=generator) < KEEP
        operator = operators.PerProblem([operators.Diagonal(m.to(images)) for m in masks])
        clean = images * masks
    else:
        operator = operators.Identity(tuple(images.shape[1:]))
        clean = images
    y = clean + sigma * torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return Measurements(y, operator, sigma)


def network() -> VDenoiser:
    """The zoo's 8x8 architecture, freshly initialised (seed 0)."""
    torch.manual_seed(0)
    net = UNet(channels=1, base_channels=16, channel_multipliers=(1, 2, 2))
    return VDenoiser(net, VP("cosine"))


def gaussian_start(data: Measurements) -> Gaussian:
    """The paper's start: the Gaussian of 3 EM rounds from N(0, I), with an exact E-step."""
    dtype = data.y.dtype
    start = Gaussian(
        torch.zeros(64, dtype=dtype), torch.eye(64, dtype=dtype), event_shape=(1, 8, 8)
    )
    exact = posterior.Exact()
    return posterior.learn_prior(
        start, data, FitMixture(1), rounds=3, engine=exact, seed=0, progress=False
    ).prior


def heldout_log_density(mixture, images: torch.Tensor) -> float:
    return float(mixture.log_prob(images.reshape(len(images), -1).double()).mean())


def posterior_scores(prior, truth: torch.Tensor, kind: str, engine, particles: int) -> dict:
    """PSNR of the posterior mean and 90% coverage, averaged over the held-out images."""
    data = corrupt(truth, kind, seed=1)
    runs = posterior.sample(
        lambda y=None: _plated(prior, data.operator, data.sigma, y),
        engine,
        num_particles=particles,
        seed=2,
        progress=False,
        model_kwargs={"y": data.y},
    )
    draws = runs.values["x"][0].float()  # (P, B, 1, 8, 8)
    mean = draws.mean(0)
    scores = [psnr(mean[b].clamp(-1, 1), truth[b]) for b in range(len(truth))]
    covered = [coverage(draws[:, b], truth[b], levels=(0.9,))[0.9] for b in range(len(truth))]
    return {"psnr": sum(scores) / len(scores), "coverage": sum(covered) / len(covered)}


def _plated(prior, operator, sigma, y):
    with pyro.plate("images", y.shape[0]):
        x = pyro.sample("x", prior)
        return pyro.sample("y", GaussianObservation(operator, x, sigma), obs=y)


def gmm_part(args, train_images, heldout, quality, lines):
    components = 10
    clean = fit_gaussian_mixture(train_images.double(), components, seed=0)
    lines += [
        "## Gaussian mixtures (10 components, exact E-step)",
        "",
        f"EM: {args.gmm_rounds} rounds of `FitMixture(10)` with `Exact()`, one posterior draw "
        "per measurement, from the Gaussian of the measurements' EM (3 rounds of "
        "`FitMixture(1)`). Held-out: mean log-density of the 300 held-out clean digits (nats, "
        "64 pixels); quality of 500 exact prior samples (`quality.py`); exact posterior "
        f"(`Exact`, 100 draws) of the first {args.posterior_images} held-out digits corrupted "
        "the same way (new masks and noise): PSNR of the posterior mean and coverage of the 90% "
        "intervals. EM time: the rounds' E- and M-steps (as recorded in their history).",
        "",
        "| data | prior | held-out log-density | confidence | class entropy | NN distance "
        "| posterior PSNR (dB) | 90% coverage | EM time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("clean digits", "ML fit to the clean digits", clean, "")]
    for kind in args.corruptions:
        data = corrupt(train_images.double(), kind, seed=0)
        naive = fit_gaussian_mixture(data.y, components, seed=0)
        gaussian = posterior.learn_prior(
            _standard_gaussian(torch.float64),
            data,
            FitMixture(1),
            rounds=3,
            engine=posterior.Exact(),
            seed=0,
            progress=False,
        )
        em = posterior.learn_prior(
            gaussian.prior,
            data,
            FitMixture(components),
            rounds=args.gmm_rounds,
            engine=posterior.Exact(),
            seed=1,
            progress=False,
            directory=None if args.directory is None else Path(args.directory) / f"gmm-{kind}",
        )
        seconds = sum(h["e_seconds"] + h["m_seconds"] for h in gaussian.history + em.history)
        evidence = ", ".join(
            f"{h['log_evidence']:.1f}" for h in em.history[:: max(1, args.gmm_rounds // 6)]
        )
        print(f"gmm {kind}: mean log-evidence by round {evidence}", flush=True)
        rows.append((kind, "naive fit to the measurements", naive, ""))
        rows.append((kind, "EM", em.prior, f"{seconds:.0f} s"))
    truth = heldout[: args.posterior_images].double()
    for data_name, name, mixture, seconds in rows:
        samples = mixture.sample((500,), generator=torch.Generator().manual_seed(0))
        scores = quality.evaluate(samples.float().reshape(500, 1, 8, 8), 8)
        kinds = args.corruptions if data_name == "clean digits" else [data_name]
        for kind in kinds:
            post = posterior_scores(mixture, truth, kind, posterior.Exact(), 100)
            lines.append(
                f"| {data_name} | {name} | {heldout_log_density(mixture, heldout):.1f} | "
                f"{scores['confidence']:.3f} | {scores['class_entropy']:.3f} | "
                f"{scores['nn_distance']:.3f} | {post['psnr']:.2f} ({kind}) | "
                f"{post['coverage']:.3f} | {seconds} |"
            )
            print(lines[-1], flush=True)
    lines.append("")


def _standard_gaussian(dtype) -> Gaussian:
    return Gaussian(torch.zeros(64, dtype=dtype), torch.eye(64, dtype=dtype), event_shape=(1, 8, 8))


def _scored_rows(lines, quality, data_name, name, prior, kinds, truth, particles, seconds):
    """One table row per corruption in ``kinds``: the quality of 500 prior samples (DDPM, seed
    0) and MMPS posteriors of ``truth`` corrupted that way; ``seconds`` is the time column."""
    samples = prior.sample((500,), generator=torch.Generator().manual_seed(0))
    scores = quality.evaluate(samples.float(), 8)
    for kind in kinds:
        post = posterior_scores(prior, truth, kind, posterior.MMPS(), particles)
        lines.append(
            f"| {data_name} | {name} | {scores['confidence']:.3f} | "
            f"{scores['class_entropy']:.3f} | {scores['nn_distance']:.3f} | "
            f"{scores['near_copies']:.3f} | {post['psnr']:.2f} ({kind}) | "
            f"{post['coverage']:.3f} | {seconds} |"
        )
        print(lines[-1], flush=True)


def network_part(args, train_images, heldout, quality, lines):
    total = args.rounds * args.steps_per_round
    lines += [
        "## Networks (the zoo's 8x8 UNet)",
        "",
        f"EM: 3 Gaussian rounds (Exact E-step), then {args.rounds} rounds of MMPS E-steps "
        f"(defaults: 64 steps, 1 CG iteration; one draw per measurement) and "
        f"{args.steps_per_round} training steps (batch 128) warm-started, {total} steps in all; "
        f"naive: the same network trained on the measurements for {total} steps; clean: the "
        "shipped `zoo.digits()` (6000 steps on the clean digits). Prior samples: 500, DDPM 100 "
        f"steps, seed 0. Posterior: MMPS (defaults), {args.particles} draws, on the first "
        f"{args.posterior_images} held-out digits corrupted the same way (new masks and noise).",
        "",
        *NETWORK_TABLE,
    ]
    truth = heldout[: args.posterior_images].float()
    rows = [("clean digits", "zoo.digits()", zoo.digits(num_steps=100), "")]
    for kind in args.corruptions:
        data = corrupt(train_images.float(), kind, seed=0)
        began = time.perf_counter()
        naive = train(
            network(),
            data.y,
            num_steps=total,
            batch_size=128,
            seed=0,
            progress=False,
            checkpoint=None
            if args.directory is None
            else Path(args.directory) / f"naive-{kind}.ckpt",
        ).denoiser
        rows.append(
            (
                kind,
                "naive",
                DiffusionPrior(naive, (1, 8, 8), num_steps=100),
                f"{time.perf_counter() - began:.0f} s",
            )
        )
        began = time.perf_counter()
        folder = None if args.directory is None else Path(args.directory) / f"network-{kind}"
        gaussian = gaussian_start(data)
        em = posterior.learn_prior(
            gaussian,
            data,
            TrainNetwork(network(), num_steps=args.steps_per_round, sampler_steps=100),
            rounds=args.rounds,
            seed=1,
            directory=folder,
            progress=True,
        )
        rows.append((kind, "EM (MMPS)", em.prior, f"{time.perf_counter() - began:.0f} s"))
    for data_name, name, prior, seconds in rows:
        kinds = args.corruptions if data_name == "clean digits" else [data_name]
        _scored_rows(lines, quality, data_name, name, prior, kinds, truth, args.particles, seconds)
    lines.append("")


def ambient_part(args, train_images, heldout, quality, lines):
    total = args.rounds * args.steps_per_round
    lines += [
        "## Ambient Diffusion (masked digits only)",
        "",
        f"`AmbientLoss({args.ambient_further})` (0.1 is the official default) on the zero-filled "
        "masked digits and their "
        f"masks, {total} steps (batch 128) of the same UNet with one mask channel, predicting "
        "x0; sampled through `AmbientDenoiser` with one fixed mask drawn with the training "
        "distribution of the further-corrupted masks (each pixel kept with probability "
        f"{KEEP} x {1 - args.ambient_further:g}), the paper's fixed-mask sampler. Columns as "
        "above.",
        "",
        *NETWORK_TABLE,
    ]
    data = corrupt(train_images.float(), "masked", seed=0)
    masks = data.operator.gains.float()
    torch.manual_seed(0)
    unet = UNet(channels=1, base_channels=16, channel_multipliers=(1, 2, 2), condition_channels=1)
    began = time.perf_counter()
    name = "ambient.ckpt" if args.ambient_further == 0.1 else f"ambient-{args.ambient_further}.ckpt"
    checkpoint = None if args.directory is None else Path(args.directory) / name
    trained = train(
        X0Denoiser(unet, VP("cosine")),
        (data.y * masks).float(),
        conditions=masks,
        loss=AmbientLoss(args.ambient_further),
        num_steps=total,
        batch_size=128,
        seed=0,
        progress=False,
        checkpoint=checkpoint,
    ).denoiser
    seconds = time.perf_counter() - began
    keep = KEEP * (1 - args.ambient_further)
    fixed = torch.rand((1, 8, 8), generator=torch.Generator().manual_seed(3)) < keep
    prior = DiffusionPrior(AmbientDenoiser(trained, fixed.float()), (1, 8, 8), num_steps=100)
    name = f"Ambient Diffusion (further {args.ambient_further})"
    truth = heldout[: args.posterior_images].float()
    _scored_rows(
        lines, quality, "masked", name, prior, ["masked"], truth, args.particles, f"{seconds:.0f} s"
    )
    lines.append("")


def unbiased_part(args, train_images, heldout, quality, lines):
    """GSURE-diffusion and Consistent-Tweedie: objectives unbiased for the clean denoiser."""
    total = args.rounds * args.steps_per_round
    lines += [
        "## GSURE-diffusion and Consistent Diffusion meets Tweedie",
        "",
        f"The zoo's UNet (v-prediction, cosine VP) trained for {total} steps (batch 128) on the "
        "measurements alone with `GSURELoss(sigma)` (masked: the masks as gains; noisy: gains of "
        "one) or `TweedieLoss(sigma)` (noisy only; with its consistency loss, its defaults, and "
        "without it, `consistency=0`). Priors trained only down to the data's noise level are "
        "sampled through `NoiseFloorDenoiser(network, sigma)`. Prior samples and posteriors as "
        "in the network section (DDPM 100 steps; MMPS, "
        f"{args.particles} draws, {args.posterior_images} held-out digits).",
        "",
        *NETWORK_TABLE,
    ]
    truth = heldout[: args.posterior_images].float()
    runs = [(kind, "gsure") for kind in args.corruptions]
    if "noisy" in args.corruptions:
        runs += [("noisy", "tweedie"), ("noisy", "tweedie-consistency")]
    for kind, method in runs:
        data = corrupt(train_images.float(), kind, seed=0)
        if method == "gsure":
            gains = (
                data.operator.gains.float()
                if isinstance(data.operator, operators.PerProblem)
                else torch.ones_like(data.y)
            )
            objective, conditions = GSURELoss(data.sigma), gains.float()
        else:
            weight = 1.0 if method == "tweedie-consistency" else 0.0
            objective, conditions = TweedieLoss(data.sigma, consistency=weight), None
        began = time.perf_counter()
        trained = train(
            network(),
            data.y.float(),
            conditions=conditions,
            loss=objective,
            num_steps=total,
            batch_size=128,
            seed=0,
            progress=False,
            checkpoint=None
            if args.directory is None
            else Path(args.directory) / f"{method}-{kind}.ckpt",
        ).denoiser
        seconds = time.perf_counter() - began
        name = {
            "gsure": "GSURE",
            "tweedie": "Tweedie, no consistency",
            "tweedie-consistency": "Tweedie + consistency",
        }[method]
        denoiser = (
            trained if method == "tweedie-consistency" else NoiseFloorDenoiser(trained, data.sigma)
        )
        prior = DiffusionPrior(denoiser, (1, 8, 8), num_steps=100)
        _scored_rows(
            lines, quality, kind, name, prior, [kind], truth, args.particles, f"{seconds:.0f} s"
        )
    lines.append("")


def speed_part(args, train_images, heldout, quality, lines):
    """Training cost of each objective on the same data and network, interleaved rounds."""
    data = corrupt(train_images.float(), "masked", seed=0)
    gains = data.operator.gains.float()
    objectives = {
        "denoising score matching (`train`'s default)": {},
        "`AmbientLoss(0.1)` (one more condition channel)": None,
        "`TweedieLoss(0.3, consistency=0)`": {"loss": TweedieLoss(0.3, consistency=0.0)},
        "`TweedieLoss(0.3)` (consistency, its defaults)": {"loss": TweedieLoss(0.3)},
        "`GSURELoss(0.02)` (masks as gains)": {"loss": GSURELoss(0.02), "conditions": gains},
    }
    steps, rounds = 100, 3
    times = {name: [] for name in objectives}
    for _ in range(rounds):
        for name, options in objectives.items():
            torch.manual_seed(0)
            if options is None:
                unet = UNet(
                    channels=1,
                    base_channels=16,
                    channel_multipliers=(1, 2, 2),
                    condition_channels=1,
                )
                denoiser = X0Denoiser(unet, VP("cosine"))
                options = {"loss": AmbientLoss(0.1), "conditions": gains}
            else:
                denoiser = network()
            began = time.perf_counter()
            train(denoiser, data.y.float(), num_steps=steps, batch_size=128, progress=False,
                  **options)  # fmt: skip
            times[name].append(time.perf_counter() - began)
    base = sorted(times[next(iter(objectives))])[rounds // 2]
    lines += [
        "## Training cost of the objectives",
        "",
        f"The zoo's 8x8 UNet, {steps} steps of batch 128 on the measurements, each objective in "
        f"turn, {rounds} interleaved rounds, medians ({args.threads} threads):",
        "",
        "| objective | s per 100 steps | relative to denoising |",
        "|---|---|---|",
    ]
    for name, values in times.items():
        median = sorted(values)[rounds // 2]
        lines.append(f"| {name} | {median:.2f} | {median / base:.2f} |")
        print(lines[-1], flush=True)
    lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--part",
        choices=["gmm", "network", "ambient", "unbiased", "speed", "all"],
        default="all",
    )
    parser.add_argument("--corruptions", default="masked,noisy")
    parser.add_argument("--gmm-rounds", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=750)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--ambient-further", type=float, default=0.1)
    parser.add_argument("--posterior-images", type=int, default=100)
    parser.add_argument("--directory", default=None, help="keeps the EM rounds (resumable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    args.corruptions = args.corruptions.split(",")
    torch.set_num_threads(args.threads)
    quality = _quality()
    train_images, _ = zoo.digits_data("train", dtype=torch.float64)
    heldout, _ = zoo.digits_data("heldout", dtype=torch.float64)
    given = sys.argv[1:]
    dropped = {i for i, a in enumerate(given) if a == "--output"}  # the flag and its value
    dropped |= {i + 1 for i in dropped}
    command = "python benchmarks/corrupted_training.py " + " ".join(
        a for i, a in enumerate(given) if i not in dropped and not a.startswith("--output=")
    )
    lines = [
        "# Priors learned from corrupted measurements (8x8 digits)",
        "",
        f"`{command.strip()}` on {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, {datetime.date.today()}. Measurements of the 1497 training "
        f"digits: `masked` keeps a random {KEEP:.0%} of each image's pixels (a new mask per "
        f"image, zero-filled) with noise sigma {SIGMA['masked']}; `noisy` observes every pixel "
        f"with noise sigma {SIGMA['noisy']} (pixels in [-1, 1]). Quality columns as in "
        "`models/zoo/QUALITY.md` (held-out real digits: confidence 0.915, class entropy 2.302, "
        "NN distance 2.062).",
        "",
    ]
    if args.part in ("gmm", "all"):
        gmm_part(args, train_images, heldout, quality, lines)
    if args.part in ("network", "all"):
        network_part(args, train_images, heldout, quality, lines)
    if args.part in ("ambient", "all"):
        ambient_part(args, train_images, heldout, quality, lines)
    if args.part in ("unbiased", "all"):
        unbiased_part(args, train_images, heldout, quality, lines)
    if args.part in ("speed", "all"):
        speed_part(args, train_images, heldout, quality, lines)
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
