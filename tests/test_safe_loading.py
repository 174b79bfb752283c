"""Safe loading: a checkpoint carrying a code-running pickle is refused and runs nothing.

SPEC.md §3, Safe loading: everything loads with ``torch.load(..., weights_only=True)``. The crafted
checkpoints here are the strongest an attacker can make: written with the package's own writer
(``write_checkpoint``), so they carry a valid checksum and pass ``verify_checkpoint`` -- only the
``weights_only`` unpickler stands between them and the code in their ``__reduce__``. (Not through
``Saver.save``: it refuses a value ``weights_only`` would refuse, SPEC.md §5.1.) Each test
loads one through a public entry point (``load_checkpoint``, ``Saver.restore``, session creation
from a file or from a directory), checks that it is refused with ``CheckpointUnloadableError`` (the
file is intact: refusing it is not finding it damaged, and it must never be reported as corrupted)
and that the marker file the code would create never appears, and finally proves the file was
armed: an unrestricted ``torch.load`` does create the marker.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import shlex
from typing import Any

import pytest
import torch

import torch_ckpt_hook as tch
from torch_ckpt_hook._checkpoint_file import write_checkpoint
from torch_ckpt_hook._state_file import update_checkpoint_state


class _RunsShellCommand:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class _ExecsPython:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


WEAPONS = {
    "os.system": (_RunsShellCommand, f"GLOBAL {os.system.__module__}.system"),
    "builtins.exec": (_ExecsPython, "GLOBAL exec "),
}


@pytest.fixture(params=sorted(WEAPONS))
def weapon(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> tuple[object, str]:
    make, refused_global = WEAPONS[request.param]
    return make(tmp_path / "pwned"), refused_global


@pytest.fixture
def marker(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "pwned"


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every ``torch.load`` call's keyword arguments, for proof that none is unrestricted."""
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    return calls


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def _write(directory: pathlib.Path, step: int, weapon: object | None) -> str:
    """A checkpoint of step ``step``, made the latest in the state file; ``weapon`` inside."""
    payload = tch.Session(_model(), global_step=step).state_dict()
    if weapon is not None:
        payload["extra_state"] = {"smuggled": {"weights": torch.zeros(2), "weapon": weapon}}
    path = str(directory / f"model.ckpt-{step}")
    write_checkpoint(path, payload)
    state = tch.get_checkpoint_state(str(directory))
    listed = [] if state is None else list(state.all_model_checkpoint_paths)
    update_checkpoint_state(str(directory), path, [*listed, path])
    return path


def _assert_armed_and_untouched(path: str, marker: pathlib.Path) -> None:
    """The marker is absent; then an unrestricted load (the control) creates it."""
    assert not marker.exists(), "the crafted checkpoint ran its code"
    torch.load(path, weights_only=False)
    assert marker.exists(), "the control: the crafted checkpoint does run code when unrestricted"


def test_the_crafted_checkpoint_passes_integrity_checks(
    tmp_path: pathlib.Path, weapon: tuple[object, str], marker: pathlib.Path
) -> None:
    path = _write(tmp_path, 1, weapon[0])

    assert tch.verify_checkpoint(path) is None, "only weights_only can refuse it"
    assert str(tmp_path / "model.ckpt-1") == tch.latest_checkpoint(str(tmp_path))
    _assert_armed_and_untouched(path, marker)


def test_load_checkpoint_refuses_a_pickle_that_runs_code(
    tmp_path: pathlib.Path,
    weapon: tuple[object, str],
    marker: pathlib.Path,
    loads: list[dict[str, Any]],
) -> None:
    path = _write(tmp_path, 1, weapon[0])

    with pytest.raises(
        tch.CheckpointUnloadableError,
        match=f"Checkpoint {path} cannot be loaded: weights_only loading refused an object",
    ) as info:
        tch.load_checkpoint(path)

    assert path in str(info.value)
    assert weapon[1] in str(info.value), "the message names what was refused"
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert [True] * len(loads) == [call.get("weights_only") for call in loads]
    assert loads, "load_checkpoint went through torch.load"
    _assert_armed_and_untouched(path, marker)


def test_saver_restore_refuses_it_and_leaves_the_session_unchanged(
    tmp_path: pathlib.Path,
    weapon: tuple[object, str],
    marker: pathlib.Path,
    loads: list[dict[str, Any]],
) -> None:
    path = _write(tmp_path, 5, weapon[0])
    model = torch.nn.Linear(3, 2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    session = tch.Session(model)

    with pytest.raises(tch.CheckpointUnloadableError, match=r"weights_only loading refused"):
        tch.Saver().restore(session, path)

    assert 0 == session.global_step
    for name, tensor in model.state_dict().items():
        assert torch.equal(before[name], tensor), name
    assert [True] * len(loads) == [call.get("weights_only") for call in loads]
    _assert_armed_and_untouched(path, marker)


def test_session_creation_from_the_crafted_file_fails_without_running_it(
    tmp_path: pathlib.Path,
    weapon: tuple[object, str],
    marker: pathlib.Path,
    loads: list[dict[str, Any]],
) -> None:
    path = _write(tmp_path, 5, weapon[0])

    with pytest.raises(tch.CheckpointUnloadableError, match=r"weights_only loading refused"):
        tch.MonitoredSession(_model(), checkpoint_filename_with_path=path)

    assert [True] * len(loads) == [call.get("weights_only") for call in loads]
    _assert_armed_and_untouched(path, marker)


def test_session_creation_from_a_directory_refuses_to_start_at_it(
    tmp_path: pathlib.Path,
    weapon: tuple[object, str],
    marker: pathlib.Path,
    loads: list[dict[str, Any]],
) -> None:
    # The refused file is intact, so it may hold the run's newest state: falling back past it to
    # the older checkpoint would silently lose the steps in between. The session refuses to
    # start instead, and nothing is written or deleted.
    _write(tmp_path, 1, None)
    crafted = _write(tmp_path, 2, weapon[0])
    assert crafted == tch.latest_checkpoint(str(tmp_path))
    before = sorted(os.listdir(tmp_path))

    with pytest.raises(tch.CheckpointError, match=re.escape(crafted)) as info:
        tch.MonitoredSession(_model(), checkpoint_dir=str(tmp_path))

    assert not isinstance(info.value, tch.CheckpointCorruptedError)
    assert weapon[1] in str(info.value), "the message names what was refused"
    assert before == sorted(os.listdir(tmp_path))
    assert [True] * len(loads) == [call.get("weights_only") for call in loads]
    _assert_armed_and_untouched(crafted, marker)
