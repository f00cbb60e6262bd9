"""Loading tensors from files without ever unpickling code.

`torch.load` always runs with ``weights_only=True`` and ``map_location="cpu"`` (adapters
trained on a GPU load on any machine); ``.safetensors`` files go through safetensors.
A file whose pickle holds anything but tensors and plain containers is refused with a
message that says so, instead of being executed.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cliplora.core.errors import InvalidArgument, NotFound, PermissionDenied


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise NotFound(f"{what} not found: {path}")
    if path.is_dir():
        raise InvalidArgument(f"{what} {path} is a folder, not a file")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise PermissionDenied(f"cannot read {what} {path}") from None


def is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript zip archive, such as the OpenAI ``clip`` package downloads."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def load_tensors(path: str | Path, what: str) -> Any:
    """Load a ``.safetensors`` file or a ``torch.save`` file of tensors, safely.

    `what` names the file's role in error messages ("LoRA checkpoint", "base weights").
    """
    path = Path(path)
    _check_readable(path, what)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read {what} {path}: not a valid safetensors file ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise InvalidArgument(
                f"refusing to load {what} {path}: it holds Python objects other than tensors, "
                "and unpickling them could run arbitrary code. Re-save it as plain tensors "
                "(torch.save of a dict of tensors, or a .safetensors file)."
            ) from None
        raise InvalidArgument(f"cannot read {what} {path}: corrupt pickle ({exc})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise InvalidArgument(
            f"cannot read {what} {path}: truncated, corrupt or not a PyTorch file ({exc})"
        ) from None


def load_torchscript_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive (OpenAI CLIP's ``ViT-B-16.pt`` and friends).

    TorchScript archives hold TorchScript, not Python pickles of arbitrary classes;
    this is how the OpenAI ``clip`` package itself reads them.
    """
    path = Path(path)
    _check_readable(path, what)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise InvalidArgument(f"cannot read {what} {path}: not a loadable TorchScript archive ({exc})") from None
    return dict(module.state_dict())
