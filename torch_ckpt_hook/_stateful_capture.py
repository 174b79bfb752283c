"""Capturing an ``extra_state`` object's state without a host-device sync.

``GradScaler.state_dict()`` returns its scale and growth tracker as Python numbers, calling
``.item()`` on device tensors: the training thread then waits for every kernel queued before the
save, which is the stall an asynchronous save exists to avoid. For a stock, enabled scaler whose
state lives on an accelerator, ``capture_state`` puts 0-dim tensors in the payload instead, and
the staging copies them to host memory with the rest, so the save never waits on the device.

Those tensors are private snapshots: clones enqueued on the current stream at the save, so they
hold the values of the step just enqueued (in stream order with everything else the save
copies), and nothing updates them afterwards. They therefore need no in-place guard: where the
saver decides whether the next step must wait for the copies at its start because of device
extra state (``needs_coarse_guard``), they do not count, and the copies keep overlapping the
next forward and backward. ``loadable_state`` turns 0-dim CPU tensors back into numbers before
``GradScaler.load_state_dict``, so a restored scaler reports a ``float`` scale as before.
Everything else (a CPU scaler, a subclass with its own ``state_dict``, any other object) goes
through its ``state_dict()`` unchanged.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch

# Tensors made by this module for one save's payload and updated by nobody: no guard needed.
_SNAPSHOTS: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()


def _snapshot(tensor: torch.Tensor) -> torch.Tensor:
    """A clone enqueued on the current stream, owned by the payload alone."""
    copy = tensor.detach().clone()
    _SNAPSHOTS.add(copy)
    return copy


def needs_coarse_guard(obj: Any) -> bool:
    """Whether ``obj`` (extra state, nested) holds a device tensor that training may update.

    Such a tensor makes the next step wait for the save's copies at its start (the in-place
    guard's coarse mode); the private snapshots of ``capture_state`` do not.
    """
    if isinstance(obj, torch.Tensor):
        return obj.device.type != "cpu" and obj not in _SNAPSHOTS
    if isinstance(obj, dict):
        return any(needs_coarse_guard(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(needs_coarse_guard(v) for v in obj)
    return False


# torch.cuda.amp.GradScaler and torch.cpu.amp.GradScaler are subclasses of this one.
_SCALER = getattr(torch.amp, "GradScaler", None)
_TENSOR_KEYS = ("scale", "_growth_tracker")


def _stock_scaler(obj: object) -> bool:
    """A ``GradScaler`` whose ``state_dict`` and ``load_state_dict`` are torch's own."""
    return (
        _SCALER is not None
        and isinstance(obj, _SCALER)
        and type(obj).state_dict is _SCALER.state_dict
        and type(obj).load_state_dict is _SCALER.load_state_dict
    )


def scaler_state(scaler: Any, *, as_tensors: bool) -> dict[str, Any]:
    """``scaler.state_dict()``, with the scale and growth tracker as 0-dim tensors if asked.

    With ``as_tensors``, nothing calls ``.item()``: the tensors are private clones of the
    scaler's (``needs_coarse_guard`` ignores them), copied to the host by the staging like every
    other tensor of the payload. Before its first step a scaler has no tensors yet; its initial
    values are plain numbers.
    """
    if not scaler.is_enabled():
        return {}
    if not as_tensors:
        return dict(scaler.state_dict())
    scale = scaler._get_scale_async()
    tracker = getattr(scaler, "_growth_tracker", None)
    return {
        "scale": scaler._init_scale if scale is None else _snapshot(scale),
        "growth_factor": scaler.get_growth_factor(),
        "backoff_factor": scaler.get_backoff_factor(),
        "growth_interval": scaler.get_growth_interval(),
        "_growth_tracker": scaler._init_growth_tracker if tracker is None else _snapshot(tracker),
    }


def _on_accelerator(scaler: Any) -> bool:
    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
    return isinstance(scale, torch.Tensor) and scale.device.type != "cpu"


def capture_state(obj: Any) -> Any:
    """``obj.state_dict()``, or for a stock GradScaler on an accelerator the same without a sync."""
    if _stock_scaler(obj) and hasattr(obj, "_init_growth_tracker") and _on_accelerator(obj):
        return scaler_state(obj, as_tensors=True)
    return obj.state_dict()


def loadable_state(obj: Any, saved: Any) -> Any:
    """``saved`` for ``obj.load_state_dict``: a stock GradScaler's 0-dim CPU tensors as numbers."""
    if not (_stock_scaler(obj) and isinstance(saved, Mapping)):
        return saved
    result = dict(saved)
    for key in _TENSOR_KEYS:
        value = result.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type == "cpu":
            result[key] = value.item()  # a CPU tensor: no device to wait for
    return result
