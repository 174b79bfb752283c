"""The raw session: the training state a checkpoint holds, and the global step counter."""

from __future__ import annotations

import copy
import functools
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ._inplace_guard import InplaceGuard
from ._rng import get_rng_state, set_rng_state
from ._validation import check_int

if TYPE_CHECKING:
    from ._copy_engine import Fence

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PAYLOAD_KEYS = ("format_version", "global_step", "model", "optimizer", "extra_state", "rng")

T = TypeVar("T")


def _type_name(value: object) -> str:
    return type(value).__qualname__


def check_global_step(value: object, name: str = "global_step") -> int:
    return check_int(name, value, minimum=0)


def check_extra_state(extra_state: object) -> dict[str, Any]:
    if extra_state is None:
        return {}
    if not isinstance(extra_state, Mapping):
        raise TypeError(
            "extra_state must be a dict of name -> object with state_dict() and "
            f"load_state_dict(), got {_type_name(extra_state)}"
        )
    for name, obj in extra_state.items():
        if not isinstance(name, str):
            raise TypeError(f"extra_state keys must be str, got {name!r}")
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(obj, method, None)):
                raise TypeError(
                    f"extra_state[{name!r}] must have a {method}() method, "
                    f"got {_type_name(obj)} which has none"
                )
    return dict(extra_state)


def _shallow_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What ``optimizer.load_state_dict`` needs to put its current state back.

    Its ``state_dict()`` refers to the live state tensors; ``load_state_dict`` installs new ones
    rather than writing into those, so they still hold the current values afterwards.
    """
    state = optimizer.state_dict()
    return {"state": dict(state["state"]), "param_groups": copy.deepcopy(state["param_groups"])}


class Session:
    """The model, optimizer, extra stateful objects and global step of one training run.

    ``global_step`` counts optimizer updates: a step post-hook on the optimizer adds 1 for every
    ``optimizer.step()`` that runs (a ``GradScaler`` that skips a step skips the count too), so
    gradient accumulation counts updates, not micro-batches. A session with no optimizer adds 1
    per ``run()``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        extra_state: Mapping[str, Any] | None = None,
        global_step: int = 0,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {_type_name(model)}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {_type_name(optimizer)}"
            )
        self._model = model
        self._optimizer = optimizer
        self._extra_state = check_extra_state(extra_state)
        self._global_step = check_global_step(global_step)
        self._step_hook: Any = None
        # The checkpoint the state came from, set by Saver.restore; any other load clears it.
        self._restored_from: str | None = None
        # Holds the next in-place update of a saved tensor until its staging copy has read it.
        self._guard = InplaceGuard(model, optimizer)
        if optimizer is not None:
            # A weak reference: the optimizer must not keep a dropped session alive.
            ref = weakref.ref(self)

            def count_step(_opt: object, _args: object, _kwargs: object) -> None:
                session = ref()
                if session is not None:
                    session._global_step += 1

            self._step_hook = optimizer.register_step_post_hook(count_step)

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer

    @property
    def extra_state(self) -> dict[str, Any]:
        return self._extra_state

    @property
    def restored_from(self) -> str | None:
        """The absolute path of the checkpoint last restored into this session, if any."""
        return self._restored_from

    @property
    def global_step(self) -> int:
        return self._global_step

    @global_step.setter
    def global_step(self, value: int) -> None:
        self._global_step = check_global_step(value)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)`` with no hooks and return its value."""
        self._guard.before_step()
        value = fn(*args, **kwargs)
        if self._optimizer is None:
            self._global_step += 1
        return value

    def close(self) -> None:
        """Stop counting the optimizer's steps (idempotent); the runners call it on close."""
        self._guard.close()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload (format version 1).

        Tensors are the live ones, on their own devices: the ``Saver`` stages them to the CPU.
        """
        return {
            "format_version": FORMAT_VERSION,
            "global_step": self._global_step,
            "model": self._model.state_dict(),
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
            "extra_state": {name: obj.state_dict() for name, obj in self._extra_state.items()},
            "rng": get_rng_state(),
        }

    def load_state_dict(
        self, state_dict: Mapping[str, Any], *, restored_from: str | None = None
    ) -> None:
        """Restore everything in the payload: model, optimizer, extra state, step and RNG states.

        ``restored_from`` names the checkpoint the payload came from (``Saver.restore`` passes
        it); it becomes ``restored_from`` once the load succeeded.

        All or nothing: the payload is checked against the session before anything changes (the
        model's keys and shapes included), and if a load still fails part-way (an extra-state
        object that raises, an optimizer that refuses its state), what was already loaded is
        put back as it was and the error propagates.
        """
        self._check_payload(state_dict)
        self._check_model_state(state_dict["model"])
        self._guard.settle()
        # Undo records, cheap ones only: the RNG states and the extra states are small, and an
        # optimizer's state_dict() refers to tensors that load_state_dict replaces rather than
        # overwrites. The model has none (a copy would double its memory); it is checked above
        # and loaded last, so nothing is loaded after it that could fail.
        rng = get_rng_state()
        undo: list[Callable[[], object]] = [functools.partial(set_rng_state, rng)]
        try:
            set_rng_state(state_dict["rng"])
            for name, obj in self._extra_state.items():
                undo.append(functools.partial(obj.load_state_dict, copy.deepcopy(obj.state_dict())))
                obj.load_state_dict(state_dict["extra_state"][name])
            if self._optimizer is not None:
                before = _shallow_optimizer_state(self._optimizer)
                undo.append(functools.partial(self._optimizer.load_state_dict, before))
                self._optimizer.load_state_dict(state_dict["optimizer"])
            self._model.load_state_dict(state_dict["model"])
        except BaseException:
            for step in reversed(undo):
                try:
                    step()
                except Exception:
                    # The object that failed may refuse its old state too; the rest still roll
                    # back, and the original error is the one that propagates.
                    logger.exception("Could not put back a state while undoing a failed restore")
            raise
        self._restored_from = restored_from
        self._global_step = state_dict["global_step"]

    def _check_model_state(self, model_state: object) -> None:
        """Raise before anything loads when ``model_state`` does not fit the model (strict)."""
        if not isinstance(model_state, Mapping):
            raise TypeError(f"state_dict['model'] must be a dict, got {_type_name(model_state)}")
        expected = self._model.state_dict()
        missing = [key for key in expected if key not in model_state]
        unexpected = [key for key in model_state if key not in expected]
        wrong_shape = [
            f"{key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}"
            for key, value in model_state.items()
            if key in expected
            and isinstance(value, torch.Tensor)
            and isinstance(expected[key], torch.Tensor)
            and value.shape != expected[key].shape
        ]
        if missing or unexpected or wrong_shape:
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected}")
            if wrong_shape:
                parts.append(f"shape mismatches [{'; '.join(wrong_shape)}]")
            raise ValueError(
                f"the checkpoint's model state does not fit the model ({', '.join(parts)}); "
                "nothing was loaded"
            )

    def clear_restored_from(self) -> None:
        """Forget the checkpoint last restored (a runner re-creating the session calls it)."""
        self._restored_from = None

    def protect_until_copied(self, fence: Fence, *, coarse: bool) -> None:
        """Make the next in-place update of a saved tensor wait on the device for ``fence``."""
        self._guard.arm(fence, coarse=coarse)

    def _check_payload(self, sd: Mapping[str, Any]) -> None:
        if not isinstance(sd, Mapping):
            raise TypeError(f"state_dict must be a dict, got {_type_name(sd)}")
        missing = [key for key in PAYLOAD_KEYS if key not in sd]
        if missing:
            raise ValueError(
                f"state_dict is not a checkpoint payload: it lacks the keys {missing} "
                f"(expected {list(PAYLOAD_KEYS)}, got {sorted(map(str, sd))})"
            )
        if sd["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"state_dict has format_version {sd['format_version']!r}; "
                f"this version of torch_ckpt_hook reads format_version {FORMAT_VERSION}"
            )
        check_global_step(sd["global_step"], "state_dict['global_step']")
        if self._optimizer is not None and sd["optimizer"] is None:
            raise ValueError(
                "the session has an optimizer but the checkpoint holds no optimizer state"
            )
        saved = sd["extra_state"]
        if not isinstance(saved, Mapping):
            raise TypeError(f"state_dict['extra_state'] must be a dict, got {_type_name(saved)}")
        absent = sorted(set(self._extra_state) - set(saved))
        if absent:
            raise ValueError(
                f"the checkpoint has no state for the session's extra_state entries {absent} "
                f"(it holds {sorted(saved)})"
            )
        if not isinstance(sd["rng"], Mapping):
            raise TypeError(f"state_dict['rng'] must be a dict, got {_type_name(sd['rng'])}")
