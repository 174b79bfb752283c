"""Staging: a copy of the payload on the CPU that training can no longer change under the writer."""

from __future__ import annotations

from typing import Any

import torch


def stage_to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor detached and on the CPU, containers rebuilt with their types.

    CPU tensors are not copied: the save that uses this is synchronous, so training cannot
    touch them before the file is written.
    """
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        return tensor if tensor.device.type == "cpu" else tensor.to("cpu")
    if isinstance(obj, dict):
        return type(obj)((key, stage_to_cpu(value)) for key, value in obj.items())
    if isinstance(obj, list):
        return [stage_to_cpu(value) for value in obj]
    if isinstance(obj, tuple):
        items = [stage_to_cpu(value) for value in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj
