"""The threaded host copy (``_parallel_copy``): every byte lands, whatever the tensors' layout.

The pools here split work into tiny pieces (``chunk_bytes``) and use threads for any size
(``min_bytes=0``), so the splitting and grouping logic runs on small tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from torch_ckpt_hook._copy_engine import HostCopyEngine
from torch_ckpt_hook._parallel_copy import CopyPool, plan, usable_cores
from torch_ckpt_hook._staging import StagingArea


@pytest.fixture
def pool() -> Iterator[CopyPool]:
    copy_pool = CopyPool(3, min_bytes=0, chunk_bytes=256)
    yield copy_pool
    copy_pool.close()


def pairs_for(sources: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.empty(s.shape, dtype=s.dtype), s) for s in sources]


def assert_copied(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for index, (dst, src) in enumerate(pairs):
        assert torch.equal(dst, src), f"pair {index} ({tuple(src.shape)}) was not copied"


def test_many_small_tensors_are_copied(pool: CopyPool) -> None:
    torch.manual_seed(0)
    sources = [torch.randn(int(n)) for n in torch.randint(0, 40, (500,))]
    sources += [torch.tensor(3.5), torch.zeros(0, 4), torch.ones(1, dtype=torch.bool)]
    pairs = pairs_for(sources)
    pool.copy(pairs)
    assert_copied(pairs)


def test_a_few_huge_tensors_are_split_and_copied(pool: CopyPool) -> None:
    torch.manual_seed(0)
    sources = [torch.randn(10_007), torch.randn(301, 97), torch.randint(-9, 9, (5, 7, 311))]
    pairs = pairs_for(sources)
    assert len(plan(pairs, 3, 256)) > 100, "each tensor is cut into pieces"
    pool.copy(pairs)
    assert_copied(pairs)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.int8, torch.bool, torch.complex64, torch.int64]
)
def test_every_dtype_is_copied(pool: CopyPool, dtype: torch.dtype) -> None:
    source = (torch.arange(5000) % 7).to(dtype)
    pairs = pairs_for([source, source[::3]])
    pool.copy(pairs)
    assert_copied(pairs)


def test_non_contiguous_sources_are_copied_into_contiguous_buffers(pool: CopyPool) -> None:
    torch.manual_seed(0)
    base = torch.randn(64, 48)
    sources = [
        base.t(),  # transposed
        base[:, ::2],  # strided columns
        base[3:60:5, 1:47],  # a strided window
        base.unsqueeze(0).expand(3, 64, 48),  # stride 0
        torch.randn(8, 9, 10).permute(2, 0, 1),
        base[:, :1].squeeze(1),
    ]
    pairs = pairs_for(sources)
    pool.copy(pairs)
    assert_copied(pairs)
    assert all(dst.is_contiguous() for dst, _ in pairs)


def test_overlapping_views_of_one_storage_are_each_copied(pool: CopyPool) -> None:
    base = torch.arange(4000, dtype=torch.float32)
    sources = [base[0:2500], base[1000:4000], base.view(40, 100)[:, 10:90], base]
    pairs = pairs_for(sources)
    pool.copy(pairs)
    assert_copied(pairs)


def test_staging_through_the_threaded_engine_keeps_tied_tensors_one_buffer(
    pool: CopyPool,
) -> None:
    weight = torch.randn(50, 40)
    before = weight.clone()
    payload = {"model": {"embed": weight, "head": weight, "bias": torch.randn(40)}, "step": 3}
    area = StagingArea(lambda device: HostCopyEngine(pool))
    staged, fence = area.stage(payload)
    fence.wait_on_host()
    weight.add_(1)  # training moves on: the snapshot must not
    assert staged["model"]["embed"] is staged["model"]["head"]
    assert torch.equal(before, staged["model"]["embed"])
    assert torch.equal(payload["model"]["bias"], staged["model"]["bias"])


def test_an_error_in_a_worker_is_raised_after_every_other_piece_finished(pool: CopyPool) -> None:
    good = pairs_for([torch.randn(3000) for _ in range(6)])
    bad = (torch.empty(4), torch.ones(5))  # not broadcastable: copy_ raises
    with pytest.raises(RuntimeError, match="must match the size"):
        pool.copy([*good[:3], bad, *good[3:]])
    assert_copied(good)
    pool.copy(good)  # the pool still works


def test_one_worker_copies_on_the_calling_thread() -> None:
    seen: list[str] = []

    class Recording(torch.Tensor):
        def copy_(self, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
            seen.append(threading.current_thread().name)
            return super().copy_(src, non_blocking)

    dst = torch.empty(1000).as_subclass(Recording)
    CopyPool(1, min_bytes=0, chunk_bytes=64).copy([(dst, torch.ones(1000))])
    assert [threading.current_thread().name] == seen


def test_a_large_copy_runs_on_the_pool_threads() -> None:
    seen: set[str] = set()
    lock = threading.Lock()

    class Recording(torch.Tensor):
        def copy_(self, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
            with lock:
                seen.add(threading.current_thread().name)
            return super().copy_(src, non_blocking)

    dsts = [torch.empty(1000).as_subclass(Recording) for _ in range(20)]
    CopyPool(2, min_bytes=0, chunk_bytes=1000).copy([(d, torch.ones(1000)) for d in dsts])
    assert seen, "nothing was copied"
    assert all(name.startswith("torch_ckpt_hook-copy") for name in seen)


def test_usable_cores_is_at_least_one() -> None:
    assert usable_cores() >= 1


def test_sources_off_the_host_are_copied_on_the_calling_thread() -> None:
    seen: list[str] = []

    class Recording(torch.Tensor):
        def copy_(self, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
            seen.append(threading.current_thread().name)
            return self

    dsts = [torch.empty(1000).as_subclass(Recording) for _ in range(4)]
    sources = [torch.empty(1000, device="meta") for _ in range(4)]
    CopyPool(2, min_bytes=0, chunk_bytes=64).copy(list(zip(dsts, sources, strict=True)))
    assert [threading.current_thread().name] * 4 == seen
