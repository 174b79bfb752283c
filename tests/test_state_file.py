"""Tests of TensorFlow's ``checkpoint`` state file in ``torch_ckpt_hook._state_file``.

Several translate TensorFlow's ``checkpoint_management_test.py`` (named in each docstring).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import uuid

import pytest
import torch

from torch_ckpt_hook._checkpoint_dir import (
    find_checkpoints,
    latest_checkpoint,
    restore_candidates,
)
from torch_ckpt_hook._fsutil import TEMP_INFIX
from torch_ckpt_hook._state_file import (
    STATE_FILENAME,
    CheckpointState,
    get_checkpoint_state,
    update_checkpoint_state,
)
from torch_ckpt_hook._text_format import format_checkpoint_state, parse_checkpoint_state

LOGGER = "torch_ckpt_hook._state_file"


def _save(path: os.PathLike[str] | str, step: int = 0) -> str:
    torch.save({"format_version": 1, "global_step": step}, path)
    return os.fspath(path)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- text format ---------------------------------------------------------------------------


def test_format_writes_tensorflow_text_format():
    text = format_checkpoint_state("model.ckpt-300", ["model.ckpt-200", "model.ckpt-300"])

    assert (
        'model_checkpoint_path: "model.ckpt-300"\n'
        'all_model_checkpoint_paths: "model.ckpt-200"\n'
        'all_model_checkpoint_paths: "model.ckpt-300"\n'
    ) == text


def test_format_escapes_like_protobuf_c_escape():
    # as_utf8=False, MessageToString's default: non-ASCII goes out as octal UTF-8 bytes.
    text = format_checkpoint_state("a\"b\\c'd\ne\tf\rg\x01é", [])

    assert 'model_checkpoint_path: "a\\"b\\\\c\\\'d\\ne\\tf\\rg\\001\\303\\251"\n' == text


def test_format_omits_empty_model_checkpoint_path_like_proto3():
    assert 'all_model_checkpoint_paths: "a"\n' == format_checkpoint_state("", ["a"])


@pytest.mark.parametrize(
    "path",
    [
        "plain/model.ckpt-1",
        'with "double" quotes',
        "with 'single' quotes",
        "back\\slash\\",
        "new\nline and\ttab and\rreturn",
        "unicode ünïcödé 模型 🚀",
        "control \x00\x07\x7f",
        "# not a comment",
    ],
)
def test_escaping_round_trips(path):
    text = format_checkpoint_state(path, ["older", path])

    assert text.isascii()
    assert (path, ["older", path]) == parse_checkpoint_state(text)


@pytest.mark.skipif(os.name == "nt", reason="POSIX file names are bytes")
def test_escaping_round_trips_file_name_that_is_not_utf8():
    path = os.fsdecode(b"model-\xff\xfe-1")

    assert (path, [path]) == parse_checkpoint_state(format_checkpoint_state(path, [path]))


def test_parse_accepts_text_format_variations():
    text = """
    # written by hand
    model_checkpoint_path : 'model.ckpt-2'   # trailing comment

    all_model_checkpoint_paths:"model.ckpt-1", all_model_checkpoint_paths: 'model.ckpt-2';
    all_model_checkpoint_timestamps: 1.5e9
    all_model_checkpoint_timestamps: [1, 2.5f, inf, -inf, nan]
    last_preserved_timestamp: -3
    """

    assert ("model.ckpt-2", ["model.ckpt-1", "model.ckpt-2"]) == parse_checkpoint_state(text)


def test_parse_accepts_list_syntax_and_adjacent_strings():
    text = 'model_checkpoint_path: "mod" \'el-2\'\nall_model_checkpoint_paths: ["m-1", "m-2"]\n'

    assert ("model-2", ["m-1", "m-2"]) == parse_checkpoint_state(text)


def test_parse_accepts_empty_list_and_empty_text():
    assert ("", []) == parse_checkpoint_state("all_model_checkpoint_paths: []")
    assert ("", []) == parse_checkpoint_state("")


def test_parse_decodes_every_escape_form():
    text = r'model_checkpoint_path: "\a\b\f\n\r\t\v\\\?\'\"\101\x42\u00e9\U0001F680\303\251"'

    assert ("\a\b\f\n\r\t\v\\?'\"ABé🚀é", []) == parse_checkpoint_state(text)


def test_parse_keeps_last_value_of_repeated_singular_field():
    text = 'model_checkpoint_path: "a"\nmodel_checkpoint_path: "b"\n'

    assert ("b", []) == parse_checkpoint_state(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('unknown_field: "x"', "line 1: CheckpointState has no field named 'unknown_field'"),
        ('model_checkpoint_path "x"', r"line 1: expected ':' after field name"),
        ('model_checkpoint_path: "x', "line 1: string value for model_checkpoint_path lacks"),
        ('\n\nmodel_checkpoint_path: "x\ny"', "line 3: string value .* lacks its closing quote"),
        ('model_checkpoint_path: "a\\qb"', r"line 1: invalid escape sequence \\q"),
        ('model_checkpoint_path: "\\777"', r"octal escape \\777 is out of range"),
        ("model_checkpoint_path: 12", "expected a string value for model_checkpoint_path"),
        ('last_preserved_timestamp: "x"', "expected a number for last_preserved_timestamp"),
        ("last_preserved_timestamp: 1.2.3", "could not parse '1.2.3' as a number"),
        ("model_checkpoint_path:", "unexpected end of input, expected a string value"),
        ('model_checkpoint_path: ["x"]', "expected a string value for model_checkpoint_path"),
        ('all_model_checkpoint_paths: ["x" "y"', "expected ',' after a value in the list"),
        (': "x"', "line 1: expected a field name, got ':'"),
        ("{", "line 1: unexpected character '{'"),
        ("model_checkpoint_path: @", "line 1: unexpected character '@'"),
    ],
)
def test_parse_rejects_malformed_text(text, message):
    with pytest.raises(ValueError, match=message):
        parse_checkpoint_state(text)


# --- update_checkpoint_state -----------------------------------------------------------------


def test_update_writes_paths_relative_to_directory(tmp_path, monkeypatch):
    """TF testUpdateCheckpointStateSaveRelativePaths, which is always on here."""
    monkeypatch.chdir(tmp_path)
    update_checkpoint_state(
        tmp_path,
        str(tmp_path / "model-2"),
        ["model-0", str(tmp_path / "model-1"), str(tmp_path / "model-2")],
    )

    content = (tmp_path / STATE_FILENAME).read_text()
    assert (
        'model_checkpoint_path: "model-2"\n'
        'all_model_checkpoint_paths: "model-0"\n'
        'all_model_checkpoint_paths: "model-1"\n'
        'all_model_checkpoint_paths: "model-2"\n'
    ) == content
    assert str(tmp_path) not in content


def test_update_resolves_relative_inputs_against_working_directory(tmp_path, monkeypatch):
    """TF testUpdateCheckpointState: paths given relative to the cwd, directory relative too."""
    monkeypatch.chdir(tmp_path)
    os.mkdir("train")
    abs_path = str(tmp_path / "model-0")
    rel_path = os.path.join("train", "model-2")
    for path in (abs_path, rel_path):
        _save(path)

    update_checkpoint_state("train", rel_path, [abs_path, rel_path])

    assert 'model_checkpoint_path: "model-2"' in (tmp_path / "train" / STATE_FILENAME).read_text()
    state = get_checkpoint_state("train")
    assert rel_path == state.model_checkpoint_path
    assert (os.path.join("train", os.pardir, "model-0"), rel_path) == (
        state.all_model_checkpoint_paths
    )


def test_update_appends_model_path_missing_from_list(tmp_path, caplog):
    """TF testAllModelCheckpointPaths / generate_checkpoint_state_proto."""
    model = str(tmp_path / "model-0")

    with caplog.at_level(logging.INFO, logger=LOGGER):
        update_checkpoint_state(tmp_path, model, [str(tmp_path / "model-2")])

    assert ("model-0", ["model-2", "model-0"]) == parse_checkpoint_state(
        (tmp_path / STATE_FILENAME).read_text()
    )
    assert f"{model} is not in all_model_checkpoint_paths. Manually adding it." in caplog.text


@pytest.mark.parametrize("paths", [None, []])
def test_update_with_no_list_lists_model_path(tmp_path, paths):
    update_checkpoint_state(tmp_path, str(tmp_path / "model-0"), paths)

    assert ("model-0", ["model-0"]) == parse_checkpoint_state(
        (tmp_path / STATE_FILENAME).read_text()
    )


def test_update_with_save_path_naming_state_file_raises(tmp_path):
    """TF testNameCollision; the message is update_checkpoint_state_internal's."""
    save_path = str(tmp_path / STATE_FILENAME)

    with pytest.raises(
        RuntimeError,
        match=(
            f"Save path '{save_path}' conflicts with path used for checkpoint state.  "
            "Please use a different save path."
        ),
    ):
        update_checkpoint_state(tmp_path, save_path, [save_path])

    assert not os.path.exists(save_path)


def test_update_with_save_path_naming_custom_state_file_raises(tmp_path):
    save_path = str(tmp_path / "state")

    with pytest.raises(RuntimeError, match="conflicts with path used for checkpoint state"):
        update_checkpoint_state(tmp_path, save_path, latest_filename="state")


def test_checkpoint_named_after_state_file_with_step_is_fine(tmp_path):
    """TF testNameCollision: ``checkpoint-1`` does not collide."""
    path = _save(tmp_path / "checkpoint-1")

    update_checkpoint_state(tmp_path, path, [path])

    assert path == latest_checkpoint(tmp_path)


@pytest.mark.parametrize("latest_filename", [os.path.join("sub", "checkpoint"), "..", "."])
def test_latest_filename_with_path_components_raises(tmp_path, latest_filename):
    with pytest.raises(ValueError, match="'latest_filename' must not contain path components"):
        update_checkpoint_state(tmp_path, str(tmp_path / "m-1"), latest_filename=latest_filename)
    with pytest.raises(ValueError, match="'latest_filename' must not contain path components"):
        get_checkpoint_state(tmp_path, latest_filename)


def test_update_with_empty_model_path_raises(tmp_path):
    with pytest.raises(ValueError, match="model_checkpoint_path must be a non-empty path"):
        update_checkpoint_state(tmp_path, "")


def test_update_replaces_state_file_atomically(tmp_path):
    first, second = _save(tmp_path / "m-1"), _save(tmp_path / "m-2")
    update_checkpoint_state(tmp_path, first, [first])

    update_checkpoint_state(tmp_path, second, [first, second])

    assert sorted(["checkpoint", "m-1", "m-2"]) == sorted(os.listdir(tmp_path))
    assert second == latest_checkpoint(tmp_path)


def test_custom_latest_filename_is_written_and_read(tmp_path):
    path = _save(tmp_path / "m-1")

    update_checkpoint_state(tmp_path, path, [path], latest_filename="my_state")

    assert not (tmp_path / STATE_FILENAME).exists()
    assert path == latest_checkpoint(tmp_path, "my_state")
    assert CheckpointState(path, (path,)) == get_checkpoint_state(tmp_path, "my_state")


# --- get_checkpoint_state ----------------------------------------------------------------------


def test_get_state_returns_paths_joined_with_directory(tmp_path):
    paths = [_save(tmp_path / f"model.ckpt-{step}", step) for step in (100, 200, 300)]
    update_checkpoint_state(tmp_path, paths[-1], paths)

    state = get_checkpoint_state(tmp_path)

    assert CheckpointState(paths[-1], tuple(paths)) == state


def test_get_state_joins_dot_relative_paths_as_is(tmp_path):
    """TF testCheckPointCompletesRelativePaths."""
    for name in ("model.ckpt-687500", "model.ckpt-687529"):
        _save(tmp_path / name)
    (tmp_path / STATE_FILENAME).write_text(
        """
        model_checkpoint_path: "./model.ckpt-687529"
        all_model_checkpoint_paths: "./model.ckpt-687500"
        all_model_checkpoint_paths: "./model.ckpt-687529"
        """
    )

    state = get_checkpoint_state(str(tmp_path))

    assert os.path.join(str(tmp_path), "./model.ckpt-687529") == state.model_checkpoint_path
    assert (
        os.path.join(str(tmp_path), "./model.ckpt-687500"),
        os.path.join(str(tmp_path), "./model.ckpt-687529"),
    ) == state.all_model_checkpoint_paths


def test_get_state_keeps_absolute_paths(tmp_path):
    """TF testAbsPath: an absolute path written by another tool is returned unchanged."""
    path = _save(tmp_path / "model-0")
    (tmp_path / STATE_FILENAME).write_text(
        format_checkpoint_state(os.path.abspath(path), [os.path.abspath(path)])
    )

    assert CheckpointState(path, (path,)) == get_checkpoint_state(tmp_path)


def test_moved_directory_still_resolves(tmp_path):
    """TF issues #571 / #9146: relative paths survive moving the directory."""
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    paths = [_save(old_dir / f"model.ckpt-{step}", step) for step in (1, 2)]
    update_checkpoint_state(old_dir, paths[-1], paths)

    new_dir = tmp_path / "new"
    shutil.move(str(old_dir), str(new_dir))

    assert str(new_dir / "model.ckpt-2") == latest_checkpoint(new_dir)
    state = get_checkpoint_state(new_dir)
    assert (str(new_dir / "model.ckpt-1"), str(new_dir / "model.ckpt-2")) == (
        state.all_model_checkpoint_paths
    )


def test_get_state_of_directory_without_state_file_is_none(tmp_path):
    assert get_checkpoint_state(tmp_path) is None
    assert get_checkpoint_state(tmp_path / "missing") is None


def test_get_state_of_empty_state_file_warns_and_is_none(tmp_path, caplog):
    """TF testCheckPointStateFailsWhenIncomplete raised ValueError; we ignore the file instead."""
    state_path = tmp_path / STATE_FILENAME
    state_path.write_text("")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert get_checkpoint_state(tmp_path) is None

    assert [f"Checkpoint state file {state_path} has no model_checkpoint_path; it is ignored."] == (
        _warnings(caplog)
    )


@pytest.mark.parametrize(
    "content",
    [b"this is not a checkpoint state", b'model_checkpoint_path: "trunc', b"\xff\xfe garbage"],
)
def test_get_state_of_unparsable_state_file_warns_naming_it(tmp_path, caplog, content):
    state_path = tmp_path / STATE_FILENAME
    state_path.write_bytes(content)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert get_checkpoint_state(tmp_path) is None

    (message,) = _warnings(caplog)
    assert message.startswith(f"Checkpoint state file {state_path} does not parse")
    assert message.endswith("it is ignored.")


def test_get_state_of_unreadable_state_file_warns_naming_it(tmp_path, caplog):
    state_path = tmp_path / STATE_FILENAME
    state_path.mkdir()

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert get_checkpoint_state(tmp_path) is None

    (message,) = _warnings(caplog)
    assert message.startswith(f"Checkpoint state file {state_path} is unreadable")


def test_get_state_drops_entries_naming_missing_files_with_warning(tmp_path, caplog):
    kept = [_save(tmp_path / "model.ckpt-1"), _save(tmp_path / "model.ckpt-3")]
    gone = str(tmp_path / "model.ckpt-2")
    update_checkpoint_state(tmp_path, kept[-1], [kept[0], gone, kept[1]])

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        state = get_checkpoint_state(tmp_path)

    assert CheckpointState(kept[-1], tuple(kept)) == state
    (message,) = _warnings(caplog)
    assert gone in message
    assert str(tmp_path / STATE_FILENAME) in message


def test_get_state_with_missing_model_path_uses_newest_remaining_entry(tmp_path, caplog):
    kept = [_save(tmp_path / "model.ckpt-1"), _save(tmp_path / "model.ckpt-2")]
    gone = str(tmp_path / "model.ckpt-3")
    update_checkpoint_state(tmp_path, gone, [*kept, gone])

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        state = get_checkpoint_state(tmp_path)

    assert CheckpointState(kept[-1], tuple(kept)) == state
    assert any(gone in m and f"using {kept[-1]} instead" in m for m in _warnings(caplog))


def test_get_state_naming_only_missing_files_is_none(tmp_path, caplog):
    update_checkpoint_state(tmp_path, str(tmp_path / "m-2"), [str(tmp_path / "m-1")])

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert get_checkpoint_state(tmp_path) is None

    (message,) = _warnings(caplog)
    assert str(tmp_path / "m-1") in message
    assert str(tmp_path / "m-2") in message


def test_checkpoint_state_is_frozen():
    state = CheckpointState("a", ("a",))

    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field"):
        state.model_checkpoint_path = "b"  # type: ignore[misc]


# --- find_checkpoints and latest_checkpoint ----------------------------------------------------


def _make_junk(directory: os.PathLike[str]) -> None:
    """Files a checkpoint directory may hold that are not committed checkpoints."""
    d = os.fspath(directory)
    _save(os.path.join(d, f"model.ckpt-900{TEMP_INFIX}{uuid.uuid4().hex}"))  # killed save
    with open(os.path.join(d, "model.ckpt-800"), "wb") as f:
        f.write(b"not a zip archive")
    complete = _save(os.path.join(d, "complete"))
    with open(complete, "rb") as src, open(os.path.join(d, "model.ckpt-700"), "wb") as dst:
        dst.write(src.read()[:-30])  # truncated: no end-of-central-directory record
    os.remove(complete)
    os.mkdir(os.path.join(d, "model.ckpt-600"))
    _save(os.path.join(d, "model.ckpt"))  # no step
    _save(os.path.join(d, "events.out"))


def test_find_checkpoints_lists_committed_checkpoints_by_step(tmp_path):
    expected = [(step, _save(tmp_path / f"model.ckpt-{step}", step)) for step in (10, 2, 100)]
    _make_junk(tmp_path)
    (tmp_path / STATE_FILENAME).write_text('model_checkpoint_path: "model.ckpt-100"\n')

    assert sorted(expected) == find_checkpoints(tmp_path)


def test_find_checkpoints_orders_equal_steps_by_mtime(tmp_path):
    newer = _save(tmp_path / "a-5")
    older = _save(tmp_path / "b-5")
    os.utime(older, (1_000_000, 1_000_000))
    os.utime(newer, (2_000_000, 2_000_000))

    assert [(5, older), (5, newer)] == find_checkpoints(tmp_path)


def test_find_checkpoints_of_missing_directory_is_empty(tmp_path):
    assert [] == find_checkpoints(tmp_path / "missing")


def test_latest_checkpoint_returns_state_file_model_path(tmp_path):
    """TF testRelativePath: a relative directory and relative save paths."""
    paths = [_save(tmp_path / f"snapshot-{step}", step) for step in (0, 1, 2)]
    # The state file, not the step numbers, decides which one is latest.
    update_checkpoint_state(tmp_path, paths[1], [paths[0], paths[2], paths[1]])

    assert paths[1] == latest_checkpoint(tmp_path)


def test_latest_checkpoint_in_relative_directory(tmp_path, monkeypatch):
    """TF testRelativePath."""
    monkeypatch.chdir(tmp_path)
    os.mkdir("train")
    paths = [_save(os.path.join("train", f"snapshot-{step}"), step) for step in (0, 1, 2)]
    update_checkpoint_state("train", paths[-1], paths)

    assert os.path.join("train", "snapshot-2") == latest_checkpoint("train")


def test_latest_checkpoint_of_empty_or_missing_directory_is_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None


def test_latest_checkpoint_without_state_file_finds_newest_checkpoint(tmp_path, caplog):
    for step in (1, 3, 2):
        _save(tmp_path / f"model.ckpt-{step}", step)
    _make_junk(tmp_path)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert str(tmp_path / "model.ckpt-3") == latest_checkpoint(tmp_path)

    assert [] == _warnings(caplog)


def test_latest_checkpoint_with_unparsable_state_file_falls_back_to_newest(tmp_path, caplog):
    for step in (1, 3, 2):
        _save(tmp_path / f"model.ckpt-{step}", step)
    _make_junk(tmp_path)
    state_path = tmp_path / STATE_FILENAME
    state_path.write_text("model_checkpoint_path: \x00garbage")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert str(tmp_path / "model.ckpt-3") == latest_checkpoint(tmp_path)

    messages = _warnings(caplog)
    assert any(m.startswith(f"Checkpoint state file {state_path} does not parse") for m in messages)
    assert (
        f"Checkpoint state file {state_path} is unusable; using the newest checkpoint in "
        f"{tmp_path} instead: {tmp_path / 'model.ckpt-3'}"
    ) in messages


def test_latest_checkpoint_with_state_naming_missing_files_falls_back(tmp_path, caplog):
    update_checkpoint_state(tmp_path, str(tmp_path / "model.ckpt-9"))
    path = _save(tmp_path / "model.ckpt-4", 4)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert path == latest_checkpoint(tmp_path)

    assert any("is unusable; using the newest checkpoint" in m for m in _warnings(caplog))


def test_latest_checkpoint_with_unusable_state_and_no_checkpoints_is_none(tmp_path, caplog):
    (tmp_path / STATE_FILENAME).write_text("garbage")
    _make_junk(tmp_path)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert latest_checkpoint(tmp_path) is None


# --- several series in one directory (best checkpoints beside the regular ones) ----------------


def _series(tmp_path, *, regular_state=True, best_state=True):
    """model.ckpt-1..2 and best.ckpt-3 in one directory, with the state files asked for."""
    regular = [_save(tmp_path / f"model.ckpt-{step}", step) for step in (1, 2)]
    best = _save(tmp_path / "best.ckpt-3", 3)
    if regular_state:
        update_checkpoint_state(tmp_path, regular[-1], regular)
    if best_state:
        update_checkpoint_state(tmp_path, best, [best], latest_filename="best_checkpoint")
    return regular, best


def test_latest_checkpoint_of_a_missing_custom_state_file_is_none(tmp_path):
    _series(tmp_path, best_state=False)

    assert latest_checkpoint(tmp_path, latest_filename="best_checkpoint") is None


def test_latest_checkpoint_of_an_unusable_custom_state_file_is_none(tmp_path):
    _series(tmp_path, best_state=False)
    (tmp_path / "best_checkpoint").write_text("garbage\n")

    assert latest_checkpoint(tmp_path, latest_filename="best_checkpoint") is None


def test_the_default_fallback_skips_checkpoints_another_state_file_lists(tmp_path):
    regular, best = _series(tmp_path, regular_state=False)

    assert regular[-1] == latest_checkpoint(tmp_path)
    assert best == latest_checkpoint(tmp_path, latest_filename="best_checkpoint")


def test_the_default_fallback_still_finds_a_custom_prefix_with_no_state_file(tmp_path):
    run = _save(tmp_path / "run.ckpt-7", 7)
    _save(tmp_path / "best.ckpt-9", 9)
    update_checkpoint_state(
        tmp_path, str(tmp_path / "best.ckpt-9"), latest_filename="best_checkpoint"
    )

    assert run == latest_checkpoint(tmp_path)


def test_a_backup_of_the_state_file_does_not_hide_the_series_it_lists(tmp_path):
    regular, _ = _series(tmp_path)
    shutil.copy(tmp_path / "checkpoint", tmp_path / "checkpoint.bak")
    (tmp_path / "checkpoint").unlink()

    assert regular[-1] == latest_checkpoint(tmp_path)


def test_restore_candidates_never_include_another_series(tmp_path):
    regular, best = _series(tmp_path)
    (tmp_path / "model.ckpt-0").write_bytes((tmp_path / "model.ckpt-1").read_bytes())

    assert [regular[1], regular[0], str(tmp_path / "model.ckpt-0")] == restore_candidates(
        str(tmp_path)
    )
    assert [best] == restore_candidates(str(tmp_path), "best_checkpoint")
