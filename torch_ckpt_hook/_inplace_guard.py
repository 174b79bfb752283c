"""Keeping a session's tensors still until their staging copies have read them (CUDA).

The copies of an asynchronous save run on a side stream after ``Saver.save`` returns. Training
must not update a saved tensor in place before its copy has read it, and it must not wait on the
host either. So the first in-place update after a save makes the *current stream* wait on the
copies' fence, which costs the host nothing and the device only the part of the copy that is
not done yet. The updates that touch saved tensors, and where the wait is placed:

- the optimizer step (parameters, optimizer state): an optimizer step pre-hook;
- buffer updates in forward (BatchNorm running statistics, spectral norm's vectors): a forward
  pre-hook, prepended, on every module that owns buffers, so the layers before it overlap with
  the copy; under ``DistributedDataParallel``, which broadcasts buffers at the start of its
  forward, a pre-hook on the wrapper itself;
- a restore (``load_state_dict``) and ``close()``, after which the session's code no longer runs.

When that is not enough, the guard waits at the start of the next step instead (``coarse``): a
session without an optimizer (the loop updates parameters itself), or extra state with tensors on
an accelerator (a stateful object whose updates no hook sees). In-place changes the loop makes
outside these (editing ``param.data`` by hand between steps) are the loop's to order; see
docs/decisions.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ._copy_engine import Fence


class InplaceGuard:
    """The fence of the latest save's copies, waited on by the first in-place update after it."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self._model = model
        self._optimizer = optimizer
        self._fence: Fence | None = None
        self._coarse = False
        self._handles: list[Any] = []

    @property
    def armed(self) -> bool:
        return self._fence is not None

    def arm(self, fence: Fence, *, coarse: bool) -> None:
        """Make the next in-place update (or, when ``coarse``, the next step) wait on ``fence``."""
        self.settle()
        self._fence = fence
        self._coarse = coarse or self._optimizer is None
        if not self._handles:
            self._install()

    def settle(self) -> None:
        """Order all work enqueued from now on after the copies (a device-side wait)."""
        fence, self._fence = self._fence, None
        if fence is not None:
            fence.wait_on_device()

    def before_step(self) -> None:
        """Called at the start of every step: waits in coarse mode, drops hooks no longer needed.

        The hooks are removed here rather than when they fire: the optimizer iterates its live
        hook dict, so a hook cannot remove itself. Between saves, training runs without them.
        """
        if self._coarse:
            self.settle()
        if self._fence is None:
            self._remove_hooks()

    def close(self) -> None:
        self.settle()
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _install(self) -> None:
        def pre_hook(*_args: Any, **_kwargs: Any) -> None:
            self.settle()

        if self._optimizer is not None:
            self._handles.append(self._optimizer.register_step_pre_hook(pre_hook))
        modules = [m for m in self._model.modules() if any(True for _ in m.buffers(recurse=False))]
        if isinstance(self._model, torch.nn.parallel.DistributedDataParallel):
            modules.insert(0, self._model)
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(pre_hook, prepend=True))
