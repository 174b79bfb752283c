"""Keeping a session's tensors still until their staging copies have read them (CUDA).

The copies of an asynchronous save run on a side stream after ``Saver.save`` returns. Training
must not update a saved tensor in place before its copy has read it, and it must not wait on the
host either. So the first in-place update after a save makes the *current stream* wait on the
copies' fence, which costs the host nothing and the device only the part of the copy that is
not done yet. The updates that touch saved tensors, and where the wait is placed:

- the optimizer step (parameters, optimizer state): a step pre-hook on every optimizer of the
  session (a GAN's two);
- buffer updates in forward (BatchNorm running statistics, spectral norm's vectors): a forward
  pre-hook, prepended, on every module that owns buffers, so the layers before it overlap with
  the copy; under ``DistributedDataParallel``, which broadcasts buffers at the start of its
  forward, a pre-hook on the wrapper itself. Under ``torch.compile`` the pre-hook goes on the
  compiled wrapper and on no module inside it: dynamo would trace a hook inside the compiled
  region, and adding or removing one there at every save would recompile;
- a restore (``load_state_dict``) and ``close()``, after which the session's code no longer runs.

When that is not enough, the guard waits at the start of the next step instead (``coarse``): a
session without an optimizer (the loop updates parameters itself), or extra state with tensors on
an accelerator (a stateful object whose updates no hook sees). In-place changes the loop makes
outside these (editing ``param.data`` by hand between steps) are the loop's to order; see
docs/decisions.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._portable_state import wrappers

if TYPE_CHECKING:
    from ._copy_engine import Fence


class InplaceGuard:
    """The fence of the latest save's copies, waited on by the first in-place update after it."""

    def __init__(self, model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self._model = model
        self._optimizers = list(optimizers)
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
        self._coarse = coarse or not self._optimizers
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

        for optimizer in self._optimizers:
            self._handles.append(optimizer.register_step_pre_hook(pre_hook))
        chain = wrappers(self._model)
        parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
        modules: list[torch.nn.Module]
        if any(not isinstance(wrapper, parallel) for wrapper in chain):
            # Compiled: the outermost wrapper's hooks run outside dynamo, before everything.
            modules = [self._model]
        else:
            owners = self._model.modules()
            modules = [m for m in owners if any(True for _ in m.buffers(recurse=False))]
            ddp = torch.nn.parallel.DistributedDataParallel
            modules[:0] = [wrapper for wrapper in chain if isinstance(wrapper, ddp)]
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(pre_hook, prepend=True))
