"""Session: the global step counter, the payload, and restoring every part of it."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from conftest import make_train_step

from torch_ckpt_hook import Saver, Session
from torch_ckpt_hook._session import FORMAT_VERSION, PAYLOAD_KEYS


class Counter:
    """A minimal stateful extra: anything with state_dict() and load_state_dict()."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state["value"]


class HalfStateful:
    def state_dict(self) -> dict[str, int]:
        return {}


SGD_ONE = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)


def test_global_step_counts_optimizer_steps(model_and_optimizer) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = model_and_optimizer
    session = Session(model, optimizer)
    step = make_train_step(model, optimizer)
    for _ in range(3):
        session.run(step)
    assert session.global_step == 3


def test_global_step_counts_updates_not_micro_batches_with_gradient_accumulation(
    model_and_optimizer,  # type: ignore[no-untyped-def]
) -> None:
    model, optimizer = model_and_optimizer
    session = Session(model, optimizer)
    accumulate = 4

    def micro_batch(index: int) -> None:
        model(torch.ones(2, 3)).sum().backward()
        if (index + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()

    for index in range(10):
        session.run(micro_batch, index)
    assert session.global_step == 2


def test_global_step_counts_one_per_run_without_optimizer() -> None:
    session = Session(torch.nn.Linear(1, 1), global_step=7)
    assert session.run(lambda x: x, "ok") == "ok"
    assert session.global_step == 8


def test_global_step_does_not_advance_when_the_step_function_raises() -> None:
    session = Session(torch.nn.Linear(1, 1))

    def failing() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        session.run(failing)
    assert session.global_step == 0


def test_close_stops_counting_optimizer_steps(model_and_optimizer) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = model_and_optimizer
    session = Session(model, optimizer)
    session.close()
    session.close()
    optimizer.step()
    assert session.global_step == 0


def test_global_step_is_settable_and_validated() -> None:
    session = Session(torch.nn.Linear(1, 1))
    session.global_step = 42
    assert session.global_step == 42
    with pytest.raises(ValueError, match=r"^global_step must be a non-negative int, got -1$"):
        session.global_step = -1
    with pytest.raises(
        TypeError, match=r"^global_step must be a non-negative int, got 1\.5 \(a float\)$"
    ):
        session.global_step = 1.5  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"model": "net"}, TypeError, r"^model must be a torch\.nn\.Module, got str$"),
        (
            {"optimizer": object()},
            TypeError,
            r"^optimizer must be a torch\.optim\.Optimizer, a list of them, or None, got object$",
        ),
        (
            {"optimizer": []},
            ValueError,
            r"^optimizer must not be an empty list; pass None for a session without an optimizer$",
        ),
        (
            {"optimizer": [SGD_ONE, "adam"]},
            TypeError,
            r"^optimizer\[1\] must be a torch\.optim\.Optimizer, got str$",
        ),
        (
            {"optimizer": [SGD_ONE, SGD_ONE]},
            ValueError,
            r"^optimizer\[1\] is optimizer\[0\] again; list each optimizer once$",
        ),
        ({"extra_state": [1]}, TypeError, r"^extra_state must be a dict of name -> object"),
        (
            {"extra_state": {"sched": 3}},
            TypeError,
            r"^extra_state\['sched'\] must be an object with state_dict\(\) and load_state_dict\(\) \(a scheduler, a GradScaler\) or a dict of plain values, got int which has no state_dict\(\) or load_state_dict\(\)$",
        ),
        (
            {"extra_state": {"half": HalfStateful()}},
            TypeError,
            r"^extra_state\['half'\] must be .* got HalfStateful which has no load_state_dict\(\)$",
        ),
        (
            {"global_step": True},
            TypeError,
            r"^global_step must be a non-negative int, got True \(a bool\)$",
        ),
        ({"global_step": -5}, ValueError, r"^global_step must be a non-negative int, got -5$"),
    ],
)
def test_constructor_validates_arguments(kwargs, error, message) -> None:  # type: ignore[no-untyped-def]
    arguments = {"model": torch.nn.Linear(1, 1), **kwargs}
    with pytest.raises(error, match=message):
        Session(**arguments)


def test_state_dict_is_the_payload(model_and_optimizer) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = model_and_optimizer
    session = Session(model, optimizer, extra_state={"counter": Counter()}, global_step=3)
    payload = session.state_dict()
    assert list(PAYLOAD_KEYS) == list(payload)
    assert payload["format_version"] == FORMAT_VERSION
    assert payload["global_step"] == 3
    assert model.state_dict().keys() == payload["model"].keys()
    assert optimizer.state_dict()["param_groups"] == payload["optimizer"]["param_groups"]
    assert payload["extra_state"] == {"counter": {"value": 0}}
    assert {"python", "numpy", "torch", "cuda"} == set(payload["rng"])


def test_payload_without_optimizer_holds_none() -> None:
    assert Session(torch.nn.Linear(1, 1)).state_dict()["optimizer"] is None


def _round_trip(payload: dict) -> dict:  # type: ignore[type-arg]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # type: ignore[no-any-return]


def test_payload_loads_with_weights_only_and_restores_everything() -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    counter = Counter()
    session = Session(model, optimizer, extra_state={"sched": scheduler, "counter": counter})

    def step() -> None:
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()

    session.run(step)
    counter.value = 11
    random.seed(5)
    np.random.seed(5)
    saved = _round_trip(session.state_dict())
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
    expected_params = [p.detach().clone() for p in model.parameters()]

    session.run(step)
    counter.value = 99
    session.load_state_dict(saved)

    assert session.global_step == 1
    assert counter.value == 11
    assert scheduler.get_last_lr() == [0.005]
    for expected, actual in zip(expected_params, model.parameters(), strict=True):
        assert torch.equal(expected, actual)
    assert expected_draws == (random.random(), float(np.random.rand()), torch.rand(1).item())


def test_load_state_dict_rejects_a_payload_missing_keys_before_changing_anything() -> None:
    model = torch.nn.Linear(1, 1)
    session = Session(model, global_step=4)
    payload = session.state_dict()
    del payload["rng"]
    payload["global_step"] = 9
    with pytest.raises(ValueError, match=r"it lacks the keys \['rng'\]"):
        session.load_state_dict(payload)
    assert session.global_step == 4


def test_load_state_dict_rejects_an_unknown_format_version() -> None:
    session = Session(torch.nn.Linear(1, 1))
    payload = {**session.state_dict(), "format_version": 2}
    with pytest.raises(
        ValueError,
        match=r"format_version 2; this version of torch_ckpt_hook reads format_version 1",
    ):
        session.load_state_dict(payload)


def test_load_state_dict_names_missing_extra_state() -> None:
    saved = Session(torch.nn.Linear(1, 1)).state_dict()
    session = Session(torch.nn.Linear(1, 1), extra_state={"counter": Counter()})
    with pytest.raises(
        ValueError, match=r"no state for the session's extra_state entries \['counter'\]"
    ):
        session.load_state_dict(saved)


def test_load_state_dict_needs_optimizer_state_when_the_session_has_an_optimizer(
    model_and_optimizer,  # type: ignore[no-untyped-def]
) -> None:
    model, optimizer = model_and_optimizer
    saved = Session(torch.nn.Linear(3, 1)).state_dict()
    with pytest.raises(ValueError, match="holds no optimizer state"):
        Session(model, optimizer).load_state_dict(saved)


# Several optimizers (SPEC §5.3): a GAN's generator and discriminator.


def _gan() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"g": torch.nn.Linear(2, 3), "d": torch.nn.Linear(3, 1)})
    opt_g = torch.optim.Adam(model["g"].parameters(), lr=0.01)
    opt_d = torch.optim.SGD(model["d"].parameters(), lr=0.1, momentum=0.9)
    return model, opt_g, opt_d


def _gan_step(model: torch.nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer):  # type: ignore[no-untyped-def]
    def step() -> None:
        for _ in range(2):  # two discriminator updates per generator update
            opt_d.zero_grad()
            model["d"](model["g"](torch.randn(4, 2)).detach()).mean().backward()
            opt_d.step()
        opt_g.zero_grad()
        (-model["d"](model["g"](torch.randn(4, 2))).mean()).backward()
        opt_g.step()

    return step


def test_several_optimizers_count_the_first_ones_steps_only() -> None:
    model, opt_g, opt_d = _gan()
    session = Session(model, [opt_g, opt_d])
    step = _gan_step(model, opt_g, opt_d)
    session.run(step)
    session.run(step)
    assert 2 == session.global_step
    assert [opt_g, opt_d] == session.optimizer
    assert (opt_g, opt_d) == session.optimizers


def test_several_optimizers_save_a_list_of_states_and_restore_each() -> None:
    model, opt_g, opt_d = _gan()
    session = Session(model, [opt_g, opt_d])
    step = _gan_step(model, opt_g, opt_d)
    session.run(step)
    saved = _round_trip(session.state_dict())
    assert isinstance(saved["optimizer"], list)
    assert 2 == len(saved["optimizer"])
    assert opt_g.state_dict()["param_groups"] == saved["optimizer"][0]["param_groups"]
    assert opt_d.state_dict()["param_groups"] == saved["optimizer"][1]["param_groups"]

    expected = [_round_trip(opt.state_dict()) for opt in (opt_g, opt_d)]
    model2, opt_g2, opt_d2 = _gan()
    opt_g2.param_groups[0]["lr"] = 0.5
    restored = Session(model2, [opt_g2, opt_d2])
    restored.load_state_dict(saved)

    assert 1 == restored.global_step
    for want, opt in zip(expected, (opt_g2, opt_d2), strict=True):
        got = opt.state_dict()
        assert want["param_groups"] == got["param_groups"]
        for index, state in want["state"].items():
            for key, value in state.items():
                assert torch.equal(value, got["state"][index][key]), f"state[{index}][{key!r}]"


@pytest.mark.parametrize(
    ("saved_with", "restored_with", "message"),
    [
        (
            "list of 2",
            "list of 1",
            r"^the session has 1 optimizers but the checkpoint holds the states of 2; pass the same optimizers, in the same order, as the run that wrote it$",
        ),
        (
            "list of 2",
            "single",
            r"^the session has a single optimizer but the checkpoint holds a list of 2 optimizer states; pass a list of 2 optimizers$",
        ),
        (
            "single",
            "list of 2",
            r"^the session has a list of 2 optimizers but the checkpoint holds the state of a single optimizer \(not a list\); pass that one optimizer alone$",
        ),
    ],
)
def test_optimizer_states_restore_only_into_as_many_optimizers(
    saved_with: str, restored_with: str, message: str
) -> None:
    def optimizers(kind: str) -> object:
        _, opt_g, opt_d = _gan()
        return {"single": opt_g, "list of 1": [opt_g], "list of 2": [opt_g, opt_d]}[kind]

    model, _, _ = _gan()
    saved = Session(model, optimizers(saved_with)).state_dict()  # type: ignore[arg-type]
    session = Session(model, optimizers(restored_with), global_step=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        session.load_state_dict(saved)
    assert 4 == session.global_step


def test_a_session_without_optimizer_restores_a_checkpoint_of_several() -> None:
    model, opt_g, opt_d = _gan()
    training = Session(model, [opt_g, opt_d], global_step=7)
    saved = _round_trip(training.state_dict())
    evaluation_model, _, _ = _gan()
    with torch.no_grad():
        evaluation_model["g"].weight.zero_()
    evaluation = Session(evaluation_model)
    evaluation.load_state_dict(saved)
    assert 7 == evaluation.global_step
    assert torch.equal(model["g"].weight, evaluation_model["g"].weight)


class RefusingOptimizer(torch.optim.SGD):
    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[type-arg, override]
        raise RuntimeError("refused")


def test_a_failed_restore_puts_back_every_optimizer_already_loaded() -> None:
    model, opt_g, _ = _gan()
    opt_d = RefusingOptimizer(model["d"].parameters(), lr=0.1, momentum=0.9)
    session = Session(model, [opt_g, opt_d])
    session.run(_gan_step(model, opt_g, opt_d))
    before = _round_trip(opt_g.state_dict())
    payload = session.state_dict()
    payload["optimizer"] = [_round_trip(opt_g.state_dict()), payload["optimizer"][1]]
    payload["optimizer"][0]["param_groups"][0]["lr"] = 0.5
    for state in payload["optimizer"][0]["state"].values():
        state["exp_avg"] = torch.full_like(state["exp_avg"], 3.0)

    with pytest.raises(RuntimeError, match="refused"):
        session.load_state_dict(payload)

    after = opt_g.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for index, state in before["state"].items():
        assert torch.equal(state["exp_avg"], after["state"][index]["exp_avg"])


# Plain values in extra_state (SPEC §5.3): nanoGPT's best_val_loss, model_args, config.


def test_a_dict_of_plain_values_is_saved_as_its_items_and_restored_in_place() -> None:
    meta = {"best_val_loss": 1e9, "model_args": {"n_layer": 2, "bias": False}, "iter_num": 0}
    session = Session(torch.nn.Linear(1, 1), extra_state={"meta": meta})
    meta["best_val_loss"] = 2.5
    meta["table"] = torch.arange(3)
    saved = _round_trip(session.state_dict())
    assert {
        "best_val_loss": 2.5,
        "model_args": {"n_layer": 2, "bias": False},
        "iter_num": 0,
        "table": saved["extra_state"]["meta"]["table"],
    } == saved["extra_state"]["meta"]

    meta["best_val_loss"] = 0.1
    meta["model_args"]["n_layer"] = 12
    meta["added_later"] = "gone after the restore"
    session.load_state_dict(saved)

    assert session.extra_state["meta"] is meta
    assert ["best_val_loss", "model_args", "iter_num", "table"] == list(meta)
    assert 2.5 == meta["best_val_loss"]
    assert {"n_layer": 2, "bias": False} == meta["model_args"]
    assert torch.equal(torch.arange(3), meta["table"])


def test_a_plain_values_entry_needs_a_dict_in_the_checkpoint() -> None:
    meta = {"best_val_loss": 3.0}
    session = Session(torch.nn.Linear(1, 1), extra_state={"meta": meta}, global_step=2)
    payload = session.state_dict()
    payload["extra_state"]["meta"] = 5
    with pytest.raises(
        TypeError,
        match=r"^state_dict\['extra_state'\]\['meta'\] must be a dict for the session's plain-values entry 'meta', got int$",
    ):
        session.load_state_dict(payload)
    assert {"best_val_loss": 3.0} == meta


class RefusingCounter(Counter):
    def load_state_dict(self, state: dict[str, int]) -> None:
        raise RuntimeError("refused")


def test_a_failed_restore_puts_back_a_plain_values_entry() -> None:
    meta = {"best_val_loss": 3.0, "history": [1, 2]}
    # Entries restore in order: the plain values load, then the counter refuses.
    session = Session(
        torch.nn.Linear(1, 1), extra_state={"meta": meta, "counter": RefusingCounter()}
    )
    payload = session.state_dict()
    payload["extra_state"]["meta"] = {"best_val_loss": 0.5}
    with pytest.raises(RuntimeError, match="refused"):
        session.load_state_dict(payload)
    assert {"best_val_loss": 3.0, "history": [1, 2]} == meta


def test_a_plain_value_that_weights_only_refuses_fails_at_save(tmp_path) -> None:  # type: ignore[no-untyped-def]
    session = Session(torch.nn.Linear(1, 1), extra_state={"meta": {"best": np.float64(1.5)}})
    with pytest.raises(TypeError, match=r"extra_state\['meta'\]\['best'\]"):
        Saver().save(session, str(tmp_path / "model.ckpt"))
