"""The raw session: the training state a checkpoint holds, and the global step counter."""

from __future__ import annotations

import copy
import functools
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import torch

from ._distributed import CheckpointGroup, SingleProcessGroup
from ._inplace_guard import InplaceGuard
from ._portable_state import strip_wrapper_prefixes, unwrap_model
from ._rank_state import rank_entry, rng_to_restore
from ._rng import get_rng_state, set_rng_state
from ._sharded_dir import SHARDED_KEY
from ._sharded_state import get_sharded_state, is_sharded, set_sharded_state
from ._stateful_capture import capture_state, loadable_state
from ._validation import check_int

if TYPE_CHECKING:
    from ._copy_engine import Fence

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PAYLOAD_KEYS = ("format_version", "global_step", "model", "optimizer", "extra_state", "rng")

T = TypeVar("T")

# What Session (and the runners) take as ``optimizer``: one, several (a GAN's two), or none.
OptimizerArg: TypeAlias = "torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None"


def _type_name(value: object) -> str:
    return type(value).__qualname__


def check_global_step(value: object, name: str = "global_step") -> int:
    return check_int(name, value, minimum=0)


def _is_stateful(obj: object) -> bool:
    return all(callable(getattr(obj, method, None)) for method in ("state_dict", "load_state_dict"))


def _is_plain(obj: object) -> bool:
    """A dict of plain values, saved as its items (an object with state_dict() is not one)."""
    return isinstance(obj, dict) and not _is_stateful(obj)


def check_extra_state(extra_state: object, what: str = "extra_state") -> dict[str, Any]:
    if extra_state is None:
        return {}
    if not isinstance(extra_state, Mapping):
        raise TypeError(
            f"{what} must be a dict of name -> object with state_dict() and "
            f"load_state_dict() or a dict of plain values, got {_type_name(extra_state)}"
        )
    for name, obj in extra_state.items():
        if not isinstance(name, str):
            raise TypeError(f"{what} keys must be str, got {name!r}")
        if _is_stateful(obj) or isinstance(obj, dict):
            continue
        methods = ("state_dict", "load_state_dict")
        lacking = [m for m in methods if not callable(getattr(obj, m, None))]
        raise TypeError(
            f"{what}[{name!r}] must be an object with state_dict() and load_state_dict() "
            f"(a scheduler, a GradScaler) or a dict of plain values, got {_type_name(obj)} "
            f"which has no {' or '.join(f'{m}()' for m in lacking)}"
        )
    return dict(extra_state)


def check_optimizers(optimizer: object) -> list[torch.optim.Optimizer]:
    """The session's optimizers, in order (empty for None); raises on anything else."""
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    if not isinstance(optimizer, (list, tuple)):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer, a list of them, or None, "
            f"got {_type_name(optimizer)}"
        )
    if not optimizer:
        raise ValueError(
            "optimizer must not be an empty list; pass None for a session without an optimizer"
        )
    first_index: dict[int, int] = {}
    for index, opt in enumerate(optimizer):
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer[{index}] must be a torch.optim.Optimizer, got {_type_name(opt)}"
            )
        if id(opt) in first_index:
            raise ValueError(
                f"optimizer[{index}] is optimizer[{first_index[id(opt)]}] again; "
                "list each optimizer once"
            )
        first_index[id(opt)] = index
    return list(optimizer)


def _states(objects: Mapping[str, Any]) -> dict[str, Any]:
    """The saved form of ``extra_state`` or ``rank_state`` objects: a plain dict's items, or
    ``state_dict()`` (a GradScaler's without a host sync, ``_stateful_capture``)."""
    return {
        name: dict(obj) if _is_plain(obj) else capture_state(obj) for name, obj in objects.items()
    }


def _restore_plain(target: dict[Any, Any], values: Mapping[Any, Any]) -> None:
    """Restore a plain-values entry in place: the user's reference sees the restored values."""
    target.clear()
    target.update(copy.deepcopy(dict(values)))


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
    gradient accumulation counts updates, not micro-batches. With a list of optimizers (a GAN's
    two) only the first one's steps count. A session with no optimizer adds 1 per ``run()``.

    The model's state is that of the module inside its DDP and ``torch.compile`` wrappers
    (``_portable_state``), so checkpoints do not depend on the wrappers.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: OptimizerArg = None,
        *,
        extra_state: Mapping[str, Any] | None = None,
        global_step: int = 0,
        rank_state: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {_type_name(model)}")
        self._optimizers = check_optimizers(optimizer)
        # A list (even of one) saves a list of states, restorable only into as many optimizers.
        self._several = isinstance(optimizer, (list, tuple))
        self._model = model
        self._extra_state = check_extra_state(extra_state)
        # Objects whose state differs per rank (SPEC 5.2): saved as the payload's rank_state.
        self._rank_state = check_extra_state(rank_state, "rank_state")
        # The ranks of the run; a runner sets the package's own group at creation.
        self._group: CheckpointGroup = SingleProcessGroup()
        self._global_step = check_global_step(global_step)
        self._step_hook: Any = None
        # False while get_state_dict initializes an optimizer's state with a step of its own.
        self._counting = True
        # The checkpoint the state came from, set by Saver.restore; any other load clears it.
        self._restored_from: str | None = None
        # Holds the next in-place update of a saved tensor until its staging copy has read it.
        self._guard = InplaceGuard(model, self._optimizers)
        if self._optimizers:
            # A weak reference: the optimizer must not keep a dropped session alive.
            ref = weakref.ref(self)

            def count_step(_opt: object, _args: object, _kwargs: object) -> None:
                session = ref()
                if session is not None and session._counting:
                    session._global_step += 1

            self._step_hook = self._optimizers[0].register_step_post_hook(count_step)

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer] | None:
        """The optimizer as given: one, a list of them, or None."""
        if self._several:
            return list(self._optimizers)
        return self._optimizers[0] if self._optimizers else None

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """Every optimizer of the session, in order (empty without one)."""
        return tuple(self._optimizers)

    @property
    def extra_state(self) -> dict[str, Any]:
        return self._extra_state

    @property
    def rank_state(self) -> dict[str, Any]:
        """The objects whose state is saved per rank (``rank_state`` in the payload)."""
        return self._rank_state

    @property
    def checkpoint_group(self) -> CheckpointGroup:
        """The ranks taking part in this session's checkpoints (one without a runner)."""
        return self._group

    def set_checkpoint_group(self, group: CheckpointGroup) -> None:
        """Use ``group`` for checkpoint collectives (the runners call it at creation)."""
        self._group = group

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded (DTensor parameters): saved through DCP."""
        return is_sharded(self._model)

    def sharded_state(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The model's and optimizers' states by ``get_state_dict`` (live tensors).

        ``get_state_dict`` gives an optimizer without state one (a step with zero gradients):
        that step is not counted.
        """
        self._counting = False
        try:
            return get_sharded_state(self._model, self._optimizers)
        finally:
            self._counting = True

    def local_rank_state(self) -> dict[str, Any] | None:
        """This rank's ``rank_state`` entry, or None when the session has no such objects."""
        if not self._rank_state:
            return None
        return _states(self._rank_state)

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
        if not self._optimizers:
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
        ``optimizer`` is a list of states for a list of optimizers; a plain-values entry of
        ``extra_state`` is saved as a copy of its items.
        """
        optimizer_state: Any
        if self.sharded:
            model_state, optimizer_state = self.sharded_state()
        else:
            model_state = unwrap_model(self._model).state_dict()
            optimizer_state = [opt.state_dict() for opt in self._optimizers]
            if not self._several:
                optimizer_state = optimizer_state[0] if optimizer_state else None
        state = {
            "format_version": FORMAT_VERSION,
            "global_step": self._global_step,
            "model": model_state,
            "optimizer": optimizer_state,
            "extra_state": _states(self._extra_state),
            "rng": get_rng_state(),
        }
        rank_state = self.local_rank_state()
        if rank_state is not None:
            # One rank's list; a distributed save gathers every rank's (SPEC 5.2).
            state["rank_state"] = [rank_state]
        return state

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
        model = unwrap_model(self._model)
        # A payload read from a sharded checkpoint (get_state_dict's layout) loads through
        # set_state_dict; DCP read it into this model's own template, so it fits.
        sharded = SHARDED_KEY in state_dict
        model_state = (
            state_dict["model"] if sharded else self._check_model_state(model, state_dict["model"])
        )
        rng_state = rng_to_restore(state_dict, self._group)
        rank_saved = self._check_rank_state(state_dict)
        self._guard.settle()
        # Undo records, cheap ones only: the RNG states and the extra states are small, and an
        # optimizer's state_dict() refers to tensors that load_state_dict replaces rather than
        # overwrites. The model has none (a copy would double its memory); it is checked above
        # and loaded last, so nothing is loaded after it that could fail.
        rng = get_rng_state()
        undo: list[Callable[[], object]] = [functools.partial(set_rng_state, rng)]
        try:
            set_rng_state(rng_state)
            for objects, saved_states in (
                (self._extra_state, state_dict["extra_state"]),
                (self._rank_state, rank_saved),
            ):
                for name, obj in objects.items():
                    if _is_plain(obj):
                        undo.append(functools.partial(_restore_plain, obj, copy.deepcopy(obj)))
                        _restore_plain(obj, saved_states[name])
                        continue
                    previous = copy.deepcopy(obj.state_dict())
                    undo.append(functools.partial(obj.load_state_dict, previous))
                    obj.load_state_dict(loadable_state(obj, saved_states[name]))
            if sharded:
                set_sharded_state(
                    self._model, self._optimizers, model_state, state_dict["optimizer"]
                )
                self._restored_from = restored_from
                self._global_step = state_dict["global_step"]
                return
            saved = state_dict["optimizer"]
            for index, optimizer in enumerate(self._optimizers):
                before = _shallow_optimizer_state(optimizer)
                undo.append(functools.partial(optimizer.load_state_dict, before))
                optimizer.load_state_dict(saved[index] if self._several else saved)
            model.load_state_dict(model_state)
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

    @staticmethod
    def _check_model_state(model: torch.nn.Module, model_state: object) -> Mapping[str, Any]:
        """The state to load into ``model`` (the unwrapped one); raises if it does not fit.

        A state saved with wrapper prefixes on every key (``module.``, ``_orig_mod.``) has them
        removed when that makes it fit (``strip_wrapper_prefixes``). Checked strictly, before
        anything loads.
        """
        if not isinstance(model_state, Mapping):
            raise TypeError(f"state_dict['model'] must be a dict, got {_type_name(model_state)}")
        expected = model.state_dict()
        model_state = strip_wrapper_prefixes(model_state, expected.keys())
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
        return model_state

    def _check_rank_state(self, sd: Mapping[str, Any]) -> Mapping[str, Any]:
        """This rank's saved ``rank_state`` entry; raises when it lacks one of the objects."""
        if not self._rank_state:
            return {}
        if "rank_state" not in sd:
            raise ValueError(
                f"the checkpoint has no rank_state, but the session has rank_state entries "
                f"{sorted(self._rank_state)}"
            )
        mine = rank_entry(sd["rank_state"], self._group, "rank_state")
        if not isinstance(mine, Mapping):
            raise TypeError(
                f"state_dict['rank_state'] entries must be dicts, got {_type_name(mine)}"
            )
        absent = sorted(set(self._rank_state) - set(mine))
        if absent:
            raise ValueError(
                f"the checkpoint has no state for the session's rank_state entries {absent} "
                f"(it holds {sorted(mine)})"
            )
        return mine

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
        if SHARDED_KEY not in sd:
            self._check_optimizer_state(sd["optimizer"])
        saved = sd["extra_state"]
        if not isinstance(saved, Mapping):
            raise TypeError(f"state_dict['extra_state'] must be a dict, got {_type_name(saved)}")
        absent = sorted(set(self._extra_state) - set(saved))
        if absent:
            raise ValueError(
                f"the checkpoint has no state for the session's extra_state entries {absent} "
                f"(it holds {sorted(saved)})"
            )
        for name, obj in self._extra_state.items():
            if _is_plain(obj) and not isinstance(saved[name], Mapping):
                raise TypeError(
                    f"state_dict['extra_state'][{name!r}] must be a dict for the session's "
                    f"plain-values entry {name!r}, got {_type_name(saved[name])}"
                )
        if not isinstance(sd["rng"], Mapping):
            raise TypeError(f"state_dict['rng'] must be a dict, got {_type_name(sd['rng'])}")

    def _check_optimizer_state(self, saved: object) -> None:
        """Raise unless ``saved`` holds a state for each of the session's optimizers.

        A session without an optimizer (evaluation) ignores whatever the checkpoint holds.
        """
        if not self._optimizers:
            return
        if saved is None:
            raise ValueError(
                "the session has an optimizer but the checkpoint holds no optimizer state"
            )
        count = len(self._optimizers)
        if not isinstance(saved, (list, tuple)):
            if self._several:
                raise ValueError(
                    f"the session has a list of {count} optimizers but the checkpoint holds the "
                    "state of a single optimizer (not a list); pass that one optimizer alone"
                )
            return
        if not self._several:
            raise ValueError(
                f"the session has a single optimizer but the checkpoint holds a list of "
                f"{len(saved)} optimizer states; pass a list of {len(saved)} optimizers"
            )
        if len(saved) != count:
            raise ValueError(
                f"the session has {count} optimizers but the checkpoint holds the states of "
                f"{len(saved)}; pass the same optimizers, in the same order, as the run that "
                "wrote it"
            )
