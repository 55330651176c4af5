"""Saving and loading results: atomic writes and one clear error for a file that cannot be read.

Used by :meth:`ParticleSet.save <diffpost.posterior.ParticleSet.save>` / ``load`` and
:func:`diffpost.diagnostics.save_datatree` / ``load_datatree``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["read_file", "write_atomically"]


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary)`` on a temporary file beside ``path``, then rename it to
    ``path`` (``os.replace``, atomic on one file system): an interrupted save leaves the previous
    file, never a truncated one. The temporary file is removed if ``write`` fails.

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save to {path}: the folder {path.parent} does not exist")
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def read_file[T](path: str | Path, what: str, read: Callable[[Path], T]) -> T:
    """``read(path)``, with one clear error naming the path and the expected format ``what``
    when the file is missing, truncated or of another format.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: ``read`` failed (the reader's own message is appended).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path} (expected {what})")
    try:
        return read(path)
    except Exception as error:  # the readers raise many types for a bad file
        raise ValueError(
            f"{path} is not a readable {what}: {type(error).__name__}: {error}"
        ) from error
