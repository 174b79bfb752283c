"""Capture and restore every random number generator a training step may draw from.

The states are built from ``weights_only``-safe values only: tuples, lists, ints, floats and CPU
tensors (NumPy's key array is stored as a list of ints, not an ``ndarray``).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

logger = logging.getLogger(__name__)

_np: Any
try:
    import numpy as _np
except ImportError:  # pragma: no cover - NumPy is optional
    _np = None


def get_rng_state() -> dict[str, Any]:
    """The RNG states of Python, NumPy (when installed), torch's CPU and every CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if _np is not None:
        np_state = _np.random.get_state(legacy=False)
        state["numpy"] = {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states that ``get_rng_state`` captured; absent generators are left alone."""
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        if _np is None:
            logger.warning("The checkpoint holds a NumPy RNG state but NumPy is not installed.")
        else:
            np_state = state["numpy"]
            _np.random.set_state(
                (
                    np_state["bit_generator"],
                    _np.asarray(np_state["key"], dtype=_np.uint32),
                    np_state["pos"],
                    np_state["has_gauss"],
                    np_state["gauss"],
                )
            )
    cuda_states = state.get("cuda") or []
    if cuda_states:
        if not torch.cuda.is_available():
            logger.warning(
                "The checkpoint holds %d CUDA RNG states but CUDA is not available; "
                "they are not restored.",
                len(cuda_states),
            )
            return
        count = torch.cuda.device_count()
        if count != len(cuda_states):
            logger.warning(
                "The checkpoint holds %d CUDA RNG states but %d devices are visible; "
                "restoring the first %d.",
                len(cuda_states),
                count,
                min(count, len(cuda_states)),
            )
        for device, device_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(device_state, device)
