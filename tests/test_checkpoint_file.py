"""Tests of one checkpoint file on disk: ``torch_ckpt_hook._checkpoint_file``."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import re
import shlex
import struct
from typing import Any

import pytest
import torch

import torch_ckpt_hook
from torch_ckpt_hook._checkpoint_file import (
    CheckpointProblem,
    check_checkpoint,
    load_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from torch_ckpt_hook._errors import CheckpointCorruptedError, CheckpointUnloadableError
from torch_ckpt_hook._integrity import ChecksumWriter, save_with_checksum
from torch_ckpt_hook._session import FORMAT_VERSION, Session

_CALLS: list[str] = []


def _record_call(arg: str) -> list[str]:
    _CALLS.append(arg)
    return _CALLS


class _AppendsToListWhenUnpickled:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_record_call, ("code ran while unpickling",))


class _RunsShellCommandWhenUnpickled:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _payload(step: int = 3) -> dict[str, Any]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    session = Session(model, optimizer, global_step=step)
    return session.state_dict()


def test_write_then_load_round_trips_session_payload(tmp_path):
    payload = _payload()
    path = tmp_path / "model.ckpt-3"

    write_checkpoint(path, payload)
    loaded = load_checkpoint(path)

    assert FORMAT_VERSION == loaded["format_version"]
    assert 3 == loaded["global_step"]
    assert payload["model"].keys() == loaded["model"].keys()
    for name, tensor in payload["model"].items():
        assert torch.equal(tensor, loaded["model"][name]), name
    momentum = payload["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, loaded["optimizer"]["state"][0]["momentum_buffer"])
    assert torch.equal(payload["rng"]["torch"], loaded["rng"]["torch"])
    assert payload["rng"]["python"] == loaded["rng"]["python"]


def test_load_maps_tensors_to_cpu_by_default(tmp_path):
    path = str(tmp_path / "model.ckpt-1")
    write_checkpoint(path, {"format_version": 1, "t": torch.arange(3)})

    assert torch.device("cpu") == load_checkpoint(path)["t"].device


def test_write_leaves_only_the_checkpoint_file(tmp_path):
    write_checkpoint(tmp_path / "model.ckpt-1", _payload())

    assert ["model.ckpt-1"] == os.listdir(tmp_path)


def test_write_failure_keeps_previous_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, {"format_version": 1, "global_step": 1})
    # A lambda cannot be pickled: torch.save fails after it has started writing the archive.
    unpicklable = {"format_version": 1, "global_step": 2, "bad": lambda: None}

    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        write_checkpoint(path, unpicklable)

    assert ["model.ckpt-1"] == os.listdir(tmp_path)
    assert 1 == load_checkpoint(path)["global_step"]


def test_load_of_missing_path_raises_value_error_naming_it(tmp_path):
    path = tmp_path / "model.ckpt-9"

    with pytest.raises(
        ValueError,
        match=f"The passed save_path is not a valid checkpoint: {path} does not exist",
    ):
        load_checkpoint(path)


def test_load_of_directory_raises_value_error_naming_it(tmp_path):
    with pytest.raises(
        ValueError,
        match=(
            f"The passed save_path is not a valid checkpoint: {tmp_path} is a directory, "
            "not a regular file"
        ),
    ):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.99], ids=["empty", "head", "half", "tail"])
def test_load_of_truncated_file_raises_corrupted_error(tmp_path, keep):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, _payload())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])

    with pytest.raises(CheckpointCorruptedError, match=f"Checkpoint {path} is corrupted: trunc"):
        load_checkpoint(path)


def test_load_of_file_that_is_not_a_checkpoint_raises_corrupted_error(tmp_path):
    path = tmp_path / "model.ckpt-1"
    path.write_text("model_checkpoint_path: 'this is a text file'\n" * 4)

    with pytest.raises(
        CheckpointCorruptedError,
        match=f"Checkpoint {path} is corrupted: truncated or damaged: the checksum trailer",
    ):
        load_checkpoint(path)


def test_crafted_pickle_is_refused_without_running_its_code(tmp_path):
    path = tmp_path / "model.ckpt-1"
    # Written with a valid checksum, so only the weights_only unpickler stands in the way.
    write_checkpoint(path, {"format_version": 1, "evil": _AppendsToListWhenUnpickled()})
    _CALLS.clear()

    with pytest.raises(
        CheckpointUnloadableError,
        match=f"Checkpoint {path} cannot be loaded: weights_only loading refused an object it holds",
    ) as info:
        load_checkpoint(path)

    assert [] == _CALLS
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    # The control: an unrestricted load does run the file's code.
    torch.load(path, weights_only=False)
    assert ["code ran while unpickling"] == _CALLS
    _CALLS.clear()


def test_crafted_pickle_calling_os_system_runs_no_command(tmp_path):
    path = tmp_path / "model.ckpt-1"
    marker = tmp_path / "pwned"
    write_checkpoint(
        path, {"format_version": 1, "evil": _RunsShellCommandWhenUnpickled(str(marker))}
    )

    with pytest.raises(
        CheckpointUnloadableError,
        match=rf"weights_only loading refused an object it holds \(GLOBAL {os.system.__module__}\.system ",
    ):
        load_checkpoint(path)

    assert not marker.exists()


def test_the_refusal_never_advises_allowlisting_or_turning_weights_only_off(tmp_path):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, {"format_version": 1, "evil": _AppendsToListWhenUnpickled()})

    with pytest.raises(CheckpointUnloadableError) as info:
        load_checkpoint(path)

    message = str(info.value)
    assert "safe_globals" not in message
    assert "weights_only=False" not in message
    assert "set to `False`" not in message
    assert 1 == len(message.splitlines()), message


@pytest.mark.parametrize(
    ("saved", "what"),
    [
        (torch.zeros(2), "a Tensor"),
        ([1, 2], "a list"),
        ({"model": {}, "global_step": 1}, r"a dict with keys \['global_step', 'model'\]"),
    ],
)
def test_load_of_intact_file_without_payload_is_unloadable_not_corrupted(tmp_path, saved, what):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, saved)

    with pytest.raises(
        CheckpointUnloadableError,
        match=(
            f"Checkpoint {path} holds no torch_ckpt_hook payload: expected a dict with "
            f"'format_version', got {what}; it loads, but is not a checkpoint this package wrote"
        ),
    ):
        load_checkpoint(path)


def test_load_with_unknown_device_name_raises_value_error(tmp_path):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, {"format_version": 1})

    with pytest.raises(ValueError, match="map_location must name a torch device, got 'gpu0'"):
        load_checkpoint(path, map_location="gpu0")


def test_package_never_loads_with_weights_only_false():
    package_dir = pathlib.Path(torch_ckpt_hook.__file__).parent
    offenders = [
        str(path)
        for path in sorted(package_dir.glob("*.py"))
        if "weights_only=False" in path.read_text().replace(" ", "")
    ]

    assert [] == offenders


# -- integrity --------------------------------------------------------------------------------


def test_verify_of_an_intact_checkpoint_finds_nothing_and_torch_load_reads_it(tmp_path):
    path = tmp_path / "model.ckpt-3"
    write_checkpoint(path, _payload(step=3))

    assert verify_checkpoint(path) is None
    # The checksum lives in the zip comment: the file is still a plain torch.save archive.
    assert 3 == torch.load(path, weights_only=True)["global_step"]


def test_every_flipped_byte_is_detected(tmp_path):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, _payload())
    data = path.read_bytes()
    # Every 31st byte of the archive, and every byte of its end: the EOCD and the trailer.
    positions = sorted({*range(0, len(data), 31), *range(len(data) - 100, len(data))})
    missed = []
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        path.write_bytes(flipped)
        if verify_checkpoint(path) is None:
            missed.append(position)

    assert [] == missed


def test_load_of_a_file_with_a_flipped_bit_raises_checksum_mismatch(tmp_path):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, _payload())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)

    with pytest.raises(
        CheckpointCorruptedError, match=f"Checkpoint {path} is corrupted: checksum mismatch"
    ):
        load_checkpoint(path)


def test_a_plain_torch_save_file_has_no_checksum_and_is_unloadable_not_corrupted(tmp_path):
    path = tmp_path / "model.ckpt-1"
    torch.save(_payload(), path)

    assert (
        "no checksum: a plain torch.save archive, not written by torch_ckpt_hook, so damage to "
        "it cannot be detected"
    ) == verify_checkpoint(path)
    assert "unloadable" == getattr(check_checkpoint(path), "kind", None)
    with pytest.raises(
        CheckpointUnloadableError,
        match=(
            f"Checkpoint {path} cannot be loaded: no checksum: a plain torch.save archive, .*; "
            r"if you trust it, load_checkpoint\(path, verify=False\) loads it, still with "
            "weights_only=True"
        ),
    ):
        load_checkpoint(path)


def test_verify_false_loads_a_plain_torch_save_file_still_with_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt-1"
    torch.save(_payload(step=4), path)
    calls: list[Any] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)

    assert 4 == load_checkpoint(path, verify=False)["global_step"]
    assert [True] == calls


def test_a_torch_save_file_of_the_format_before_zip_archives_is_unloadable(tmp_path):
    path = tmp_path / "model.ckpt-1"
    torch.save(_payload(step=5), path, _use_new_zipfile_serialization=False)

    assert CheckpointProblem(
        "unloadable",
        "no checksum: a torch.save file of the format before zip archives (torch < 1.6), not "
        "written by torch_ckpt_hook, so damage to it cannot be detected",
    ) == check_checkpoint(path)
    with pytest.raises(CheckpointUnloadableError, match=r"no checksum: a torch\.save file of the"):
        load_checkpoint(path)
    assert 5 == load_checkpoint(path, verify=False)["global_step"]


def test_verify_false_still_reports_a_damaged_file_as_corrupted(tmp_path):
    path = tmp_path / "model.ckpt-1"
    torch.save(_payload(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(
        CheckpointCorruptedError,
        match=(
            f"Checkpoint {path} is corrupted: torch.load cannot parse it: .*"
            r"\(its checksum was not checked: verify=False\)"
        ),
    ):
        load_checkpoint(path, verify=False)


def test_a_file_whose_checksum_holds_but_torch_cannot_parse_is_unloadable(tmp_path):
    # What a newer torch's format would look like to this one: bytes exactly as written, so not
    # damage, but not parseable here. Made by breaking the pickle before the checksum is taken.
    plain = io.BytesIO()
    torch.save({"format_version": 1, "x": [1, 2, 3], "t": torch.zeros(3)}, plain)
    data = bytearray(plain.getvalue())
    data[data.find(b"data.pkl") + 61] ^= 0x55  # "Unsupported operand" for the unpickler
    path = tmp_path / "model.ckpt-1"
    with open(path, "wb") as f:
        writer = ChecksumWriter(f)
        writer.write(bytes(data))
        writer.finish()
    assert verify_checkpoint(path) is None

    with pytest.raises(
        CheckpointUnloadableError,
        match=(
            f"Checkpoint {path} cannot be loaded: its checksum holds, so its bytes are as they "
            f"were written, but torch {re.escape(torch.__version__)} cannot parse them "
            r"\(the weights_only unpickler failed: Unsupported operand"
        ),
    ) as info:
        load_checkpoint(path)
    assert "weights_only=False" not in str(info.value)
    assert "set to `False`" not in str(info.value)


def _save_with_checksum(path: pathlib.Path, payload: Any) -> None:
    with open(path, "wb") as f:
        save_with_checksum(payload, f)


class _CustomValue:
    pass


def test_a_numpy_array_in_a_checksummed_file_is_unloadable_naming_the_global(tmp_path):
    numpy = pytest.importorskip("numpy")
    path = tmp_path / "model.ckpt-1"
    _save_with_checksum(path, {"format_version": 1, "stats": numpy.zeros(3)})
    assert check_checkpoint(path) is None, "the file is intact"

    with pytest.raises(
        CheckpointUnloadableError,
        match=(
            f"Checkpoint {path} cannot be loaded: weights_only loading refused an object it "
            r"holds \(GLOBAL numpy\.\S+ was not an allowed global by default\); a checkpoint "
            "may hold only tensors and plain Python values"
        ),
    ) as info:
        load_checkpoint(path)
    assert "safe_globals" not in str(info.value)


def test_a_custom_class_in_a_checksummed_file_is_unloadable_naming_the_global(tmp_path):
    path = tmp_path / "model.ckpt-1"
    _save_with_checksum(path, {"format_version": 1, "extra": _CustomValue()})

    with pytest.raises(
        CheckpointUnloadableError,
        match=rf"\(GLOBAL {__name__}\._CustomValue was not an allowed global by default\)",
    ):
        load_checkpoint(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("map_location", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_a_cuda_map_location_without_cuda_is_unloadable_not_corrupted(tmp_path, map_location):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, _payload())

    with pytest.raises(
        CheckpointUnloadableError,
        match=(
            rf"Checkpoint {path} cannot be loaded with map_location={re.escape(repr(map_location))} "
            r"\(the file itself is intact\): this machine has no CUDA device "
            r"\(torch\.cuda\.is_available\(\) is False\); pass map_location='cpu'"
        ),
    ):
        load_checkpoint(path, map_location=map_location)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_damaged_file_is_corrupted_whatever_the_map_location(tmp_path):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, _payload())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)

    with pytest.raises(CheckpointCorruptedError, match="is corrupted: checksum mismatch"):
        load_checkpoint(path, map_location="cuda")


def test_a_file_holding_cuda_tensors_without_cuda_is_unloadable(tmp_path):
    # torch.load's own device check (here reached through a map_location callable this package
    # cannot look into) is unloadable too, not damage.
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, _payload())

    def to_cuda(storage: Any, location: str) -> Any:
        raise RuntimeError(
            "Attempting to deserialize object on a CUDA device but torch.cuda.is_available() is "
            "False. If you are running on a CPU-only machine, please use torch.load with ..."
        )

    with pytest.raises(
        CheckpointUnloadableError,
        match=(
            f"Checkpoint {path} cannot be loaded with map_location=<function .*>: Attempting to "
            r"deserialize object on a CUDA device but torch\.cuda\.is_available\(\) is False; "
            "pass map_location='cpu'"
        ),
    ):
        load_checkpoint(path, map_location=to_cuda)


@pytest.mark.parametrize(
    ("setup", "kind", "message"),
    [
        ("intact", None, None),
        ("flipped", "corrupted", "checksum mismatch: "),
        ("truncated", "corrupted", "truncated or damaged: "),
        ("plain", "unloadable", "no checksum: a plain torch.save archive"),
        ("missing", "unreadable", "unreadable: No such file or directory"),
        ("dir", "not_a_file", "not a regular file: it is a directory"),
    ],
)
def test_check_checkpoint_sorts_each_problem_into_its_kind(tmp_path, setup, kind, message):
    # FIFOs, devices and sockets: test_nonregular_files.py, under a deadline.
    path = tmp_path / "model.ckpt-1"
    if setup in ("intact", "flipped", "truncated"):
        write_checkpoint(path, _payload())
        data = bytearray(path.read_bytes())
        if setup == "flipped":
            data[len(data) // 3] ^= 0x04
        if setup == "truncated":
            data = data[:-10]
        path.write_bytes(data)
    elif setup == "plain":
        torch.save(_payload(), path)
    elif setup == "dir":
        path.mkdir()

    problem = check_checkpoint(path)

    assert kind == (None if problem is None else problem.kind)
    assert (problem.message if problem is not None else None) == verify_checkpoint(path)
    if message is not None:
        assert problem is not None
        assert problem.message.startswith(message), problem


def test_checksum_writer_handles_writes_of_any_size(tmp_path):
    class OneByteAtATime:
        def __init__(self, target: Any) -> None:
            self.target = target

        def write(self, data: Any) -> int:
            for byte in bytes(data):
                self.target.write(bytes([byte]))
            return len(data)

        def flush(self) -> None:
            self.target.flush()

    reference = tmp_path / "reference"
    write_checkpoint(reference, _payload())
    path = tmp_path / "model.ckpt-1"
    with open(path, "wb") as f:
        writer = ChecksumWriter(f)
        torch.save(torch.load(reference, weights_only=True), OneByteAtATime(writer))  # type: ignore[arg-type]
        writer.finish()

    assert verify_checkpoint(path) is None
    assert 3 == load_checkpoint(path)["global_step"]


def test_torch_skips_its_record_crcs_for_our_saves_only(tmp_path):
    import zipfile

    ours = tmp_path / "model.ckpt-1"
    write_checkpoint(ours, _payload())
    plain = tmp_path / "plain.pt"
    torch.save(_payload(), plain)

    # Our file: one whole-file CRC, torch's per-record CRCs skipped (torch.load never reads them).
    assert {0} == {info.CRC for info in zipfile.ZipFile(ours).infolist() if info.file_size}
    # Everyone else's torch.save is unchanged, on this thread as on any other.
    assert torch.serialization.get_crc32_options()
    assert zipfile.ZipFile(plain).testzip() is None
    assert all(info.CRC for info in zipfile.ZipFile(plain).infolist() if info.file_size)


@pytest.mark.parametrize("overlap_min", [1, 1 << 10, 1 << 40], ids=["all", "large", "none"])
def test_the_crc_is_the_same_whether_computed_beside_the_write_or_inline(tmp_path, overlap_min):
    path = tmp_path / "model.ckpt-1"
    payload = {**_payload(), "big": torch.arange(300_000, dtype=torch.float32)}
    with open(path, "wb") as f:
        save_with_checksum(payload, f, overlap_min=overlap_min)

    assert verify_checkpoint(path) is None
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x80
    path.write_bytes(data)
    assert "checksum mismatch" in (verify_checkpoint(path) or "")


def test_a_file_that_cannot_be_opened_or_read_is_an_oserror_and_unreadable_not_corrupted(
    tmp_path, monkeypatch
):
    import builtins
    import errno
    import io

    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, _payload())
    real_open = builtins.open

    def no_permission(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_permission)
    with pytest.raises(PermissionError):
        load_checkpoint(path)
    assert CheckpointProblem("unreadable", "unreadable: Permission denied") == check_checkpoint(
        path
    )

    class FailingReads(io.BufferedReader):
        def read(self, *args: Any) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

    def failing_reads(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if os.fspath(file) == str(path):
            return FailingReads(io.FileIO(str(path), "rb"))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_reads)
    # An I/O error says nothing of the bytes: not corruption, which a user would delete.
    with pytest.raises(OSError, match="Input/output error") as info:
        load_checkpoint(path)
    assert not isinstance(info.value, CheckpointCorruptedError)
    assert CheckpointProblem("unreadable", "unreadable: Input/output error") == check_checkpoint(
        path
    )


# -- one pass: the checksum runs beside torch.load (issue 14) ------------------------------------


def _verify_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name == "torch_ckpt_hook-verify"]


def test_damage_that_torch_parses_is_still_corrupted_and_never_returned(tmp_path):
    path = tmp_path / "model.ckpt-1"
    payload = _payload()
    payload["model"] = {"weight": torch.arange(4096, dtype=torch.float32)}
    write_checkpoint(path, payload)
    data = bytearray(path.read_bytes())
    # A byte of the tensor's record: torch.load reads it without complaint.
    at = data.find(struct.pack("<4f", 1000.0, 1001.0, 1002.0, 1003.0))
    assert at > 0
    data[at] ^= 0x40
    path.write_bytes(data)
    assert torch.load(path, weights_only=True)["model"]["weight"][1000] != 1000.0
    with pytest.raises(CheckpointCorruptedError, match="checksum mismatch"):
        load_checkpoint(path)
    assert [] == _verify_threads()


def test_damage_that_torch_cannot_parse_is_corrupted_not_unloadable(tmp_path):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, _payload())
    data = bytearray(path.read_bytes())
    pickle_at = data.find(b"data.pkl") + len(b"data.pkl")
    for offset in range(pickle_at, pickle_at + 64):
        data[offset] ^= 0xFF  # the pickle's opening bytes
    path.write_bytes(data)
    with pytest.raises(CheckpointCorruptedError, match="checksum mismatch") as info:
        load_checkpoint(path)
    assert not isinstance(info.value, CheckpointUnloadableError)
    assert [] == _verify_threads()


def test_a_verified_load_leaves_no_thread_behind(tmp_path):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, _payload())
    assert 3 == load_checkpoint(path)["global_step"]
    assert [] == _verify_threads()
