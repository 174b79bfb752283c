"""Tests of one checkpoint file on disk: ``torch_ckpt_hook._checkpoint_file``."""

from __future__ import annotations

import os
import pathlib
import pickle
import shlex
from typing import Any

import pytest
import torch

import torch_ckpt_hook
from torch_ckpt_hook._checkpoint_file import load_checkpoint, verify_checkpoint, write_checkpoint
from torch_ckpt_hook._errors import CheckpointCorruptedError
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
        match=f"The passed save_path is not a valid checkpoint: {tmp_path} is a directory",
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
        CheckpointCorruptedError,
        match=f"Checkpoint {path} is corrupted or unreadable: weights_only loading refused",
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
        CheckpointCorruptedError,
        match=f"weights_only loading refused .*GLOBAL {os.system.__module__}.system",
    ):
        load_checkpoint(path)

    assert not marker.exists()


def test_the_refusal_never_advises_allowlisting_the_refused_global(tmp_path):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, {"format_version": 1, "evil": _AppendsToListWhenUnpickled()})

    with pytest.raises(CheckpointCorruptedError) as info:
        load_checkpoint(path)

    assert "add_safe_globals" not in str(info.value)
    assert "safe_globals" not in str(info.value)


@pytest.mark.parametrize(
    ("saved", "what"),
    [
        (torch.zeros(2), "a Tensor"),
        ([1, 2], "a list"),
        ({"model": {}, "global_step": 1}, r"a dict with keys \['global_step', 'model'\]"),
    ],
)
def test_load_of_file_without_payload_raises_corrupted_error(tmp_path, saved, what):
    path = tmp_path / "model.ckpt-1"
    write_checkpoint(path, saved)

    with pytest.raises(
        CheckpointCorruptedError,
        match=(
            f"Checkpoint {path} holds no torch_ckpt_hook payload: expected a dict with "
            f"'format_version', got {what}"
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


def test_a_plain_torch_save_file_has_no_checksum(tmp_path):
    path = tmp_path / "model.ckpt-1"
    torch.save(_payload(), path)

    assert "no checksum: a plain torch.save archive" in (verify_checkpoint(path) or "")
    with pytest.raises(CheckpointCorruptedError, match="no checksum"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["missing", "dir"])
def test_verify_reports_an_unreadable_path(tmp_path, name):
    path = tmp_path / name
    if name == "dir":
        path.mkdir()

    assert (verify_checkpoint(path) or "").startswith("unreadable: ")


def test_checksum_writer_handles_writes_of_any_size(tmp_path):
    from torch_ckpt_hook._integrity import ChecksumWriter

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
def test_the_crc_is_the_same_whether_computed_beside_the_write_or_inline(
    tmp_path, monkeypatch, overlap_min
):
    import torch_ckpt_hook._integrity as integrity

    monkeypatch.setattr(integrity, "_OVERLAP_MIN", overlap_min)
    path = tmp_path / "model.ckpt-1"
    payload = {**_payload(), "big": torch.arange(300_000, dtype=torch.float32)}
    write_checkpoint(path, payload)

    assert verify_checkpoint(path) is None
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x80
    path.write_bytes(data)
    assert "checksum mismatch" in (verify_checkpoint(path) or "")


def test_a_file_that_cannot_be_opened_is_an_oserror_and_a_failed_read_is_corruption(
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
    assert "unreadable: Permission denied" == verify_checkpoint(path)

    class FailingReads(io.BufferedReader):
        def read(self, *args: Any) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

    def failing_reads(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if os.fspath(file) == str(path):
            return FailingReads(io.FileIO(str(path), "rb"))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_reads)
    with pytest.raises(CheckpointCorruptedError, match="is corrupted: unreadable: Input/output"):
        load_checkpoint(path)
