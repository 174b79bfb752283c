"""Portable model state: checkpoints do not depend on DDP or ``torch.compile`` wrappers.

SPEC.md §5.2 "Replicated models" and §5.3 "Portable model state": the payload's ``model`` holds
the wrapped module's keys (no ``module.`` / ``_orig_mod.`` prefixes), a checkpoint written with a
wrapper restores without it and the other way round, and a checkpoint that still has the
prefixes (written by a hand-rolled loop) restores too.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from torch_ckpt_hook import Session
from torch_ckpt_hook._portable_state import strip_wrapper_prefixes, unwrap_model, wrappers


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)
    )


def _round_trip(payload: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def process_group() -> Iterator[None]:
    """A one-process gloo group on the loopback interface, for DDP."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


# A compiled DDP graph-breaks at DDP's buffer broadcast, and dynamo warns about it (once).
pytestmark = pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace:UserWarning")


def _compile(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` with the eager backend (no inductor); skips where even that fails."""
    try:
        torch.compile(torch.nn.Linear(1, 1), backend="eager")(torch.ones(1, 1))
    except Exception as err:  # pragma: no cover - depends on the platform
        pytest.skip(f"torch.compile(backend='eager') is unavailable here: {err}")
    return torch.compile(model, backend="eager")  # type: ignore[return-value]


def _ddp(model: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.parallel.DistributedDataParallel(model)


WRAPS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "compiled": _compile,
    "ddp": _ddp,
    "compiled ddp": lambda m: _compile(_ddp(m)),
    "ddp of compiled": lambda m: _ddp(_compile(m)),
}
EXPECTED_PREFIX = {
    "compiled": "_orig_mod.",
    "ddp": "module.",
    "compiled ddp": "_orig_mod.module.",
    "ddp of compiled": "module._orig_mod.",
}


@pytest.fixture(params=list(WRAPS))
def wrap(request: pytest.FixtureRequest) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """Each wrapper, with a process group while it involves DDP."""
    if "ddp" in request.param:
        request.getfixturevalue("process_group")
    return WRAPS[request.param]


def _assert_same_state(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert list(want) == list(got)
    for key, value in want.items():
        assert torch.equal(value, got[key]), f"{key} differs"


def _train_a_step(model: torch.nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 3)).sum().backward()
    optimizer.step()


def test_the_payload_holds_the_wrapped_modules_keys(wrap) -> None:  # type: ignore[no-untyped-def]
    plain = _model()
    wrapped = wrap(plain)
    assert wrapped is not plain
    assert plain is unwrap_model(wrapped)
    assert list(plain.state_dict()) == list(Session(wrapped).state_dict()["model"])


def test_a_checkpoint_written_with_a_wrapper_restores_into_the_plain_model(wrap) -> None:  # type: ignore[no-untyped-def]
    written = _model(seed=1)
    wrapped = wrap(written)
    _train_a_step(wrapped)
    saved = _round_trip(Session(wrapped, global_step=3).state_dict())

    plain = _model(seed=2)
    session = Session(plain)
    session.load_state_dict(saved)

    assert 3 == session.global_step
    _assert_same_state(written, plain)


def test_a_checkpoint_of_the_plain_model_restores_into_a_wrapped_one(wrap) -> None:  # type: ignore[no-untyped-def]
    plain = _model(seed=1)
    _train_a_step(plain)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    saved = _round_trip(Session(plain, optimizer).state_dict())

    inner = _model(seed=2)
    wrapped = wrap(inner)
    restored = torch.optim.SGD(wrapped.parameters(), lr=0.5, momentum=0.9)
    Session(wrapped, restored).load_state_dict(saved)

    assert 0.1 == restored.param_groups[0]["lr"]

    _assert_same_state(plain, inner)
    with torch.no_grad():
        wrapped.eval()
        plain.eval()
        inputs = torch.randn(5, 3)
        assert torch.equal(plain(inputs), wrapped(inputs))


def test_a_checkpoint_with_wrapper_prefixes_restores_into_plain_and_wrapped_models(
    wrap,  # type: ignore[no-untyped-def]
    request: pytest.FixtureRequest,
) -> None:
    written = _model(seed=1)
    wrapped = wrap(written)
    _train_a_step(wrapped)
    # What a hand-rolled loop saved: the wrapper's own state_dict().
    saved = _round_trip({**Session(written).state_dict(), "model": wrapped.state_dict()})
    prefix = EXPECTED_PREFIX[request.node.callspec.params["wrap"]]
    assert all(key.startswith(prefix) for key in saved["model"])

    plain = _model(seed=2)
    Session(plain).load_state_dict(saved)
    _assert_same_state(written, plain)

    inner = _model(seed=3)
    Session(wrap(inner)).load_state_dict(saved)
    _assert_same_state(written, inner)


def test_wrappers_are_listed_outermost_first(process_group: None) -> None:
    plain = _model()
    compiled = _compile(plain)
    ddp = _ddp(compiled)
    assert [ddp, compiled] == wrappers(ddp)
    assert [] == wrappers(plain)
    assert plain is unwrap_model(plain)


def test_stripping_keeps_the_inner_modules_metadata() -> None:
    plain = _model()
    prefixed = torch.nn.DataParallel(plain).state_dict()  # no GPU: DataParallel stays a wrapper
    stripped = strip_wrapper_prefixes(prefixed, plain.state_dict().keys())
    assert list(plain.state_dict()) == list(stripped)
    assert plain.state_dict()._metadata == stripped._metadata  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("keys", "expected", "result"),
    [
        # Not every key has the prefix: left as it is.
        (["module.w", "head.w"], ["w", "head.w"], ["module.w", "head.w"]),
        # The model's own child is called "module": the keys match already.
        (["module.w"], ["module.w"], ["module.w"]),
        # DDP around such a model: one prefix goes, not two.
        (["module.module.w"], ["module.w"], ["module.w"]),
        # Stripping would not make the keys fit: the error names the keys as saved.
        (["module.w", "module.b"], ["w"], ["module.w", "module.b"]),
        (["_orig_mod.module.w"], ["w"], ["w"]),
        ([], [], []),
    ],
)
def test_prefixes_are_stripped_only_when_that_makes_the_keys_fit(
    keys: list[str], expected: list[str], result: list[str]
) -> None:
    state = {key: torch.zeros(1) for key in keys}
    assert result == list(strip_wrapper_prefixes(state, expected))


def test_a_prefixed_checkpoint_that_does_not_fit_names_its_keys_as_saved() -> None:
    saved = Session(torch.nn.Linear(2, 2)).state_dict()
    saved["model"] = {"module.weight": torch.zeros(2, 2)}
    with pytest.raises(
        ValueError,
        match=r"missing keys \['weight', 'bias'\], unexpected keys \['module\.weight'\]",
    ):
        Session(torch.nn.Linear(2, 2)).load_state_dict(saved)


def test_shape_checks_use_the_unwrapped_model(process_group: None) -> None:
    saved = Session(torch.nn.Linear(2, 3)).state_dict()
    session = Session(_ddp(torch.nn.Linear(2, 2)), global_step=5)
    with pytest.raises(
        ValueError, match=r"shape mismatches \[weight: checkpoint \(3, 2\), model \(2, 2\)"
    ):
        session.load_state_dict(saved)
    assert 5 == session.global_step
