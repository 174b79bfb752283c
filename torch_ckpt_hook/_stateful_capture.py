"""Capturing an ``extra_state`` object's state without a host-device sync.

``GradScaler.state_dict()`` returns its scale and growth tracker as Python numbers, calling
``.item()`` on device tensors: the training thread then waits for every kernel queued before the
save, which is the stall an asynchronous save exists to avoid. For a stock, enabled scaler whose
state lives on an accelerator, ``capture_state`` puts the two 0-dim tensors themselves in the
payload instead (the staging copies them to host memory with the rest, after the step that was
just enqueued), so the save never waits on the device. The other entries are the scaler's own
Python values. ``GradScaler.load_state_dict`` accepts 0-dim tensors where it expects numbers;
``loadable_state`` turns the CPU ones back into numbers first, so a restored scaler reports a
``float`` scale as before. Everything else (a CPU scaler, a subclass with its own
``state_dict``, any other object) goes through its ``state_dict()`` unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

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

    With ``as_tensors``, nothing calls ``.item()``: the tensors are the scaler's live ones
    (the staging copies them at the save, like every other tensor of the payload). Before its
    first step a scaler has no tensors yet; its initial values are plain numbers.
    """
    if not scaler.is_enabled():
        return {}
    if not as_tensors:
        return dict(scaler.state_dict())
    scale = scaler._get_scale_async()
    tracker = getattr(scaler, "_growth_tracker", None)
    return {
        "scale": scaler._init_scale if scale is None else scale.detach(),
        "growth_factor": scaler.get_growth_factor(),
        "backoff_factor": scaler.get_backoff_factor(),
        "growth_interval": scaler.get_growth_interval(),
        "_growth_tracker": scaler._init_growth_tracker if tracker is None else tracker.detach(),
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
