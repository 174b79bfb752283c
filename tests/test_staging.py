"""Staging the payload on the CPU before it is written."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch

from torch_ckpt_hook import Saver, Session, load_checkpoint
from torch_ckpt_hook._staging import stage_to_cpu

Pair = namedtuple("Pair", ["a", "b"])


def test_staging_keeps_the_payload_structure_and_detaches_tensors() -> None:
    weight = torch.ones(2, requires_grad=True)
    payload = {
        "model": OrderedDict(w=weight),
        "list": [1, (2.0, weight)],
        "pair": Pair(weight, None),
    }
    staged = stage_to_cpu(payload)
    assert isinstance(staged["model"], OrderedDict)
    assert isinstance(staged["pair"], Pair)
    assert [1, (2.0, staged["list"][1][1])] == staged["list"]
    assert not staged["model"]["w"].requires_grad
    assert torch.equal(weight.detach(), staged["pair"].a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_model_is_written_with_cpu_tensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = torch.nn.Linear(2, 2).cuda()
    path = Saver().save(Session(model), str(tmp_path / "model.ckpt"), 0)
    loaded = torch.load(path, weights_only=True)  # no map_location: the file itself is on the CPU
    assert "cpu" == loaded["model"]["weight"].device.type
    assert "cpu" == load_checkpoint(path)["model"]["bias"].device.type
