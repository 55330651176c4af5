"""diffpost: posterior sampling for inverse problems with diffusion priors, declared as Pyro models.

One import namespace with three parts, imported one way (``models`` <- ``posterior`` <-
``diagnostics``):

- :mod:`diffpost.models`: what users declare (schedules, denoisers, priors, operators,
  observations, shipped priors in ``zoo``, training);
- :mod:`diffpost.posterior`: how it is inferred (``Problem``, the engines, ``sample``,
  ``ParticleSet``);
- :mod:`diffpost.diagnostics`: what is learned from a run (ArviZ DataTree, metrics, calibration,
  plots).

Example::

    from diffpost import diagnostics, models, posterior

The three parts live in the repository's top-level folders ``models/``, ``posterior/`` and
``diagnostics/``; ``pyproject.toml`` maps them into this package (setuptools ``package-dir``).
They are imported on first use, so ``import diffpost`` itself is instant.
"""

import importlib

__version__ = "0.2.0"

_PARTS = ("models", "posterior", "diagnostics")

__all__ = ["__version__", *_PARTS]


def __getattr__(name: str):
    if name in _PARTS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PARTS))
