"""Quality check of the shipped priors; ``python scripts/zoo/quality.py`` writes ``QUALITY.md``
and the same numbers as ``quality.json`` (read by ``tests/test_zoo.py``).

For the digits priors (8x8, 16x16 and MNIST 28x28), two questions, asked of samples drawn with
the library's own unconditional sampler:

1. *Do they look like digits?* A support-vector classifier (scikit-learn ``SVC``, RBF kernel,
   ``C = 10``) trained on the training split, with probabilities calibrated by Platt's sigmoid
   on 5-fold cross-validated decision values (``CalibratedClassifierCV(..., ensemble=False)``),
   scores each sample. Reported: the mean of its largest class probability (``confidence``), the
   fraction of samples above 0.9, and the entropy of the histogram of predicted classes
   (:math:`\\ln 10 \\approx 2.303` when all ten digits are equally frequent). The same numbers for
   the 300 held-out real digits are the reference.
2. *Are they copies?* The median Euclidean distance from each sample to its nearest training
   image (on the ``[-1, 1]`` scale), next to the same distance for the held-out real digits: a
   memorising prior would sit far below the reference. Also the fraction of near-copies:
   samples nearer to a training image than any held-out digit is (0.66 at 8x8), 0 for real
   digits by construction.

scikit-learn is a development dependency (the dev extra), needed only here.

References:
    Platt. Probabilistic outputs for support vector machines. 1999.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffpost.models import zoo

#: the shipped priors' folder in this repository (the scripts write their outputs there)
ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"

__all__ = ["SETTINGS", "RECORDED", "classifier", "evaluate", "draw", "main"]

#: where the recorded numbers are kept (a dict: name -> metrics, with "heldout8"/"heldout16").
RECORDED = ZOO.joinpath("quality.json")

#: prior name -> how its recorded samples are drawn (also what tests/test_zoo.py reproduces).
SETTINGS = {
    "digits": {"num_samples": 500, "sampler": "ddpm", "num_steps": 100, "seed": 0},
    "digits16": {"num_samples": 200, "sampler": "ddpm", "num_steps": 50, "seed": 0},
    "digits_gmm": {"num_samples": 500, "sampler": "exact", "num_steps": 0, "seed": 0},
    "mnist": {"num_samples": 200, "sampler": "ddpm", "num_steps": 50, "seed": 0},
}
#: image size of each prior's samples
SIZES = {"digits": 8, "digits16": 16, "digits_gmm": 8, "mnist": 28}
#: the patch prior's denoising check: photographs and noise levels (0..255 scale)
PHOTOS = ("camera", "astronaut", "coffee")
NOISE_LEVELS = (15, 25, 50)
TV_WEIGHTS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4)


def _zoo_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"zoo_{name}", ZOO.parents[1] / "scripts" / "zoo" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def reference_digits(size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(train images, train labels, held-out images)`` at ``size`` (8, 16 or 28), float64."""
    if size == 28:
        images, labels, heldout = _zoo_script("train_digits").mnist_split()
        train = images[~heldout, None].double() / 127.5 - 1.0
        return train, labels[~heldout], zoo.mnist_data(dtype=torch.float64)[0]
    train, labels = zoo.digits_data("train", size=size, dtype=torch.float64)
    return train, labels, zoo.digits_data("heldout", size=size, dtype=torch.float64)[0]


@functools.cache
def classifier(size: int = 8):
    """The SVC trained on the training split of the digits at ``size`` (8, 16 or 28)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    images, labels, _ = reference_digits(size)
    model = CalibratedClassifierCV(SVC(C=10.0), method="sigmoid", cv=5, ensemble=False)
    return model.fit(images.reshape(len(images), -1).numpy(), labels.numpy())


def evaluate(samples: Tensor, size: int = 8) -> dict[str, float]:
    """Classifier confidence, class coverage and nearest-neighbour distance of ``samples``.

    Args:
        samples: images ``(M, 1, size, size)`` on the ``[-1, 1]`` scale.
        size: 8, 16 or 28.

    Returns:
        ``confidence`` (mean max-probability), ``confident`` (fraction above 0.9),
        ``class_entropy`` (nats), ``nn_distance`` (median distance to the nearest training
        image), ``near_copies`` (fraction nearer to a training image than any held-out digit).
    """
    flat = samples.detach().reshape(len(samples), -1).to("cpu", torch.float64)
    probabilities = classifier(size).predict_proba(flat.numpy())
    top = probabilities.max(axis=1)
    counts = np.bincount(probabilities.argmax(axis=1), minlength=10) / len(top)
    counts = counts[counts > 0]
    train, _, heldout = reference_digits(size)
    train = train.reshape(len(train), -1)
    closest_real = torch.cdist(heldout.reshape(len(heldout), -1), train).min()
    distances = torch.cdist(flat, train).min(dim=1).values
    return {
        "confidence": float(top.mean()),
        "confident": float((top > 0.9).mean()),
        "class_entropy": float(-(counts * np.log(counts)).sum()),
        "nn_distance": float(distances.median()),
        "near_copies": float((distances < closest_real).double().mean()),
    }


def draw(name: str) -> Tensor:
    """The recorded samples of the prior ``name`` (settings in :data:`SETTINGS`)."""
    settings = SETTINGS[name]
    generator = torch.Generator().manual_seed(settings["seed"])
    shape = torch.Size([settings["num_samples"]])
    if name == "digits_gmm":
        return zoo.digits_gmm().sample(shape, generator=generator)
    prior = getattr(zoo, name)(sampler=settings["sampler"], num_steps=settings["num_steps"])
    return prior.sample(shape, generator=generator)


def psnr(estimate: Tensor, truth: Tensor) -> float:
    """PSNR in dB on the ``[-1, 1]`` scale (the library's, data range 2)."""
    from diffpost.diagnostics.scores import psnr as library_psnr

    return library_psnr(estimate, truth, data_range=2.0)


def patch_denoising() -> dict[str, dict[str, float]]:
    """PSNR of the noisy photograph, of the patch prior's Tweedie mean and of oracle-tuned TV,
    per photograph and noise level (keys ``"camera/25"``, ...)."""
    from skimage.restoration import denoise_tv_chambolle

    prior = zoo.natural_patches((1, 256, 256), dtype=torch.float64)
    schedule = prior.schedule
    results = {}
    for name in PHOTOS:
        truth = zoo.photo(name, dtype=torch.float64)
        for level in NOISE_LEVELS:
            ratio = 2.0 * level / 255.0
            noise = torch.randn(
                truth.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
            )
            noisy = truth + ratio * noise
            t = schedule.time_of_noise_ratio(torch.tensor(ratio, dtype=torch.float64))
            with torch.no_grad():
                denoised = prior.denoise(schedule.alpha(t) * noisy[None], t)[0]
            tv = max(
                psnr(torch.as_tensor(denoise_tv_chambolle(noisy[0].numpy(), weight=w))[None], truth)
                for w in TV_WEIGHTS
            )
            results[f"{name}/{level}"] = {
                "noisy": psnr(noisy, truth),
                "prior": psnr(denoised, truth),
                "tv_oracle": tv,
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ZOO.joinpath("QUALITY.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, recorded = [], {}
    for size in (8, 16, 28):
        heldout = reference_digits(size)[2]
        recorded[f"heldout{size}"] = evaluate(heldout, size)
        what = (
            "held-out real MNIST digits 28x28"
            if size == 28
            else f"held-out real digits {size}x{size}"
        )
        rows.append((what, f"{len(heldout)} images", recorded[f"heldout{size}"]))
    for name, settings in SETTINGS.items():
        start = time.time()
        samples = draw(name)
        seconds = time.time() - start
        how = (
            f"{settings['num_samples']} exact samples"
            if settings["sampler"] == "exact"
            else f"{settings['num_samples']} samples, {settings['sampler']} "
            f"{settings['num_steps']} steps ({seconds:.0f} s)"
        )
        recorded[name] = evaluate(samples, SIZES[name])
        rows.append((f"`zoo.{name}()`", how, recorded[name]))
    lines = [
        "# Quality of the shipped priors",
        "",
        "Written by `python scripts/zoo/quality.py` (see its docstring for the definitions); "
        "`tests/test_zoo.py` draws the same samples (seed 0) and checks these numbers.",
        f"Class entropy of a uniform histogram: ln 10 = {math.log(10):.3f}.",
        "",
        "| what | samples | confidence | fraction > 0.9 | class entropy | NN distance to train | "
        "near copies |",
        "|---|---|---|---|---|---|---|",
    ]
    for what, how, metrics in rows:
        lines.append(
            f"| {what} | {how} | {metrics['confidence']:.3f} | {metrics['confident']:.3f} | "
            f"{metrics['class_entropy']:.3f} | {metrics['nn_distance']:.3f} | "
            f"{metrics['near_copies']:.3f} |"
        )
    denoising = patch_denoising()
    recorded["natural_patches"] = denoising
    lines += [
        "",
        "## Natural-image patch prior: denoising held-out photographs",
        "",
        "`zoo.natural_patches((1, 256, 256))`, one denoiser call (Tweedie mean, one shifted grid) "
        "at the noise level of the measurement; PSNR in dB (256x256, seed 0). TV: "
        "`denoise_tv_chambolle` with its weight chosen by PSNR against the truth (oracle-tuned).",
        "",
        "| photograph | sigma (0..255) | noisy | patch prior | TV (oracle weight) |",
        "|---|---|---|---|---|",
    ]
    for key, row in denoising.items():
        name, level = key.split("/")
        lines.append(
            f"| {name} | {level} | {row['noisy']:.2f} | {row['prior']:.2f} | "
            f"{row['tv_oracle']:.2f} |"
        )
    lines += ["", "## Training", ""]
    for name in ("digits", "digits16", "mnist"):
        saved = torch.load(ZOO.joinpath(f"{name}.pt"), weights_only=True)
        count = sum(v.numel() for v in saved["state_dict"].values())
        training = saved["training"]
        lines.append(
            f"- `{name}.pt`: UNet {saved['network']}, {count} parameters, "
            f"{training['steps_done']} steps of batch {training['batch_size']} "
            f"(`train_digits.py`); mean training loss (v-prediction) over the last 500 steps "
            f"{float(saved['loss_curve'][-5:].mean()):.4f}."
        )
    saved = torch.load(ZOO.joinpath("natural_patches.pt"), weights_only=True)
    training = saved["training"]
    lines.append(
        f"- `natural_patches.pt`: UNet {saved['network']} in a 16x16 `PatchNetwork`, "
        f"{sum(v.numel() for v in saved['state_dict'].values())} parameters, "
        f"{training['steps_done']} steps of batch {training['batch_size']} on "
        f"{training['pool']} patches of {', '.join(training['images'])} (`train_patches.py`); "
        f"mean training loss over the last 500 steps {float(saved['loss_curve'][-5:].mean()):.4f}."
    )
    args.output.write_text("\n".join(lines) + "\n")
    RECORDED.write_text(json.dumps(recorded, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
