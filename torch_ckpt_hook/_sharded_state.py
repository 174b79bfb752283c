"""Sharded models (FSDP2 ``fully_shard``, DTensor parameters): detection and their state dicts.

A model is sharded when one of its parameters or buffers is a ``DTensor``. Its model and
optimizer states are then taken and loaded through ``torch.distributed.checkpoint.state_dict``
(``get_state_dict`` / ``set_state_dict``): fully qualified parameter names as the optimizer's
keys, so a checkpoint reshards to another world size. ``optimizer`` in such a payload is the
one dict ``get_state_dict`` returns for all of the session's optimizers.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds a ``DTensor`` parameter or buffer."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return False
    tensors = itertools.chain(model.parameters(), model.buffers())
    return any(isinstance(t, dtensor) for t in tensors)


def get_sharded_state(
    model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model's and the optimizers' states as ``get_state_dict`` returns them (live)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, list(optimizers))
    return model_state, (optim_state if optimizers else None)


def set_sharded_state(
    model: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    model_state: Mapping[str, Any],
    optim_state: Mapping[str, Any] | None,
) -> None:
    """Load states taken by ``get_sharded_state`` (or read into its template)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        model,
        list(optimizers),
        model_state_dict=dict(model_state),
        optim_state_dict=dict(optim_state or {}),
    )
