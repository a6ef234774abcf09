"""Run files (``flow.pt``, ``checkpoint.pt``) that carry only tensors, numeric arrays and plain data, read
without running any code.

``flow.pt`` and ``checkpoint.pt`` are files users are told to share; a pickle can run code when it is
read. They are therefore written as tensors, numeric NumPy arrays and plain data only (:func:`to_plain`:
NumPy scalars become Python numbers, object arrays are refused) and read with
``torch.load(weights_only=True)`` (:func:`load_plain`), which builds nothing but tensors, containers and
primitives; the only additions to its allow-list, inside the call (no global change), are the pieces
NumPy needs to rebuild an array of numbers (``_reconstruct``, ``ndarray``, numeric dtypes: no object
dtype, so no arbitrary object inside an array either). Anything else (a crafted payload) is refused
without running it, with a message; a file that holds other objects but that the user trusts (made by
themselves with another tool or version) can be converted, only on that explicit request, with
:func:`convert_trusted` (``python -m openmm_cgflow.safe_files FILE``).

(``pmf.pt`` is TorchScript, read by ``torch.jit.load``, which does not unpickle Python objects.)
"""

from __future__ import annotations

import io
import os
import pickle
import re
import sys

import numpy as np
import torch
from openmm_cgflow_plugin.files import atomic_write

__all__ = ["UnsafeFileError", "to_plain", "check_plain", "load_plain", "save_plain", "convert_trusted", "to_numpy"]


class UnsafeFileError(ValueError):
    """A run file holds Python objects that only an unsafe (code-running) load could build."""


def to_plain(obj, where: str = "payload"):
    """``obj`` with NumPy arrays as tensors and NumPy scalars as Python numbers: what
    ``torch.load(weights_only=True)`` reads (tensors, dicts, lists, tuples, str, int, float, bool, None,
    torch dtypes). Other objects are left as they are (``torch.save`` may pickle them or fail; a file
    holding them would be refused by :func:`load_plain`, so writers check with :func:`check_plain`)."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        if obj.dtype not in _NUMERIC_DTYPES:
            raise TypeError(f"{where}: an array of dtype {obj.dtype} cannot be stored in a run file (numbers only)")
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    return obj


def check_plain(data: bytes, what: str = "run file") -> None:
    """Raise TypeError if the torch file ``data`` would not load with ``weights_only=True``."""
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TypeError(f"{what} holds objects beyond tensors, numeric arrays and plain data: {exc}") from None


#: NumPy dtypes a run file may hold (numbers and booleans).
_NUMERIC_DTYPES = tuple(np.dtype(t) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16,
                                               np.int8, np.uint8, np.bool_))
#: What ``torch.load(weights_only=True)`` must additionally accept to rebuild such arrays (and nothing else).
_RECONSTRUCT = np._core.multiarray._reconstruct
_NUMPY_GLOBALS = ([_RECONSTRUCT, (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, bytes]
                  + sorted({type(d) for d in _NUMERIC_DTYPES}, key=str))


def to_numpy(x):
    """A stored array (tensor, list or array) as a NumPy array (None stays None)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.numpy()
    return np.asarray(x)


def save_plain(path, payload: dict) -> None:
    """Write ``to_plain(payload)`` with ``torch.save`` atomically."""
    data = to_plain(payload)
    with atomic_write(path) as fh:
        torch.save(data, fh)


def load_plain(path, what: str = "run file"):
    """``torch.load(path, weights_only=True)``: tensors, numeric arrays and plain data only, no code run.

    Raises UnsafeFileError (a ValueError) naming the file for one that holds other Python objects (a
    crafted payload, or a file of an older openmm-cgflow, with how to convert the latter), ValueError for
    a file that is not a torch file at all (truncated, corrupt)."""
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own text advises weights_only=False: quote only its diagnosis ("Unsupported global: ...")
        lines = [line.strip() for line in str(exc).splitlines()]
        detail = next((line for line in lines if line.startswith("Unsupported") or "GLOBAL" in line), "")
        if "global" not in detail.lower():  # no forbidden object: a broken file (e.g. "Unsupported operand 110")
            raise ValueError(f"{what} {path} is unreadable (truncated or corrupt?): {detail or 'not a torch file'}; "
                             "delete it or restore a good copy") from None
        raise UnsafeFileError(
            f"{what} {path} cannot be loaded safely: it holds Python objects other than tensors, numeric arrays and plain data "
            f"({_global_name(detail)}), and loading it could run code. If you trust this file (you made it, e.g. "
            f"with another version or tool), convert it once with "
            f"`python -m openmm_cgflow.safe_files {path}`; never convert a file from an untrusted source"
        ) from None
    except Exception as exc:
        raise ValueError(f"{what} {path} is unreadable (truncated or corrupt?): {exc}; delete it or restore a "
                         "good copy") from exc


def _global_name(detail: str) -> str:
    """``"found builtins.open"`` from torch's "Unsupported global: GLOBAL builtins.open was not ..." text."""
    m = re.search(r"GLOBAL\s+([\w.]+)", detail)
    return f"found {m.group(1)}" if m else detail[:120]


def convert_trusted(path) -> None:
    """Rewrite the TRUSTED file ``path`` (a flow.pt or checkpoint.pt of an older openmm-cgflow) as tensors
    and plain data. This unpickles the file with ``weights_only=False``, which runs any code it carries:
    only for files you made yourself."""
    path = os.fspath(path)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    save_plain(path, payload)


if __name__ == "__main__":  # pragma: no cover - a user's one-off conversion
    if len(sys.argv) < 2:
        sys.exit("usage: python -m openmm_cgflow.safe_files FILE [FILE ...]  (trusted files only: loading runs their code)")
    for name in sys.argv[1:]:
        convert_trusted(name)
        print(f"converted {name}: it now loads with torch.load(weights_only=True)")
