"""The num_splits heuristic (jax_mla._common.num_splits_heuristic) is a pure
function of the work items, the cache length, the KV tile and the worker
count: its properties, and those of the native plan's work_items() and of the
clamping in choose_num_splits, tested without running a kernel."""

from __future__ import annotations

import pytest

from jax_mla import _common, _ffi

from .conftest import KV_TILE

TILE = 32
GRID = [(items, seq_kv, workers) for items in (0, 1, 2, 3, 8, 16, 100, 1000)
        for seq_kv in (0, 1, 31, 32, 33, 127, 128, 200, 4096, 100_000)
        for workers in (1, 2, 16, 128)]


def heuristic(items, seq_kv, workers, tile=TILE):
    return _common.num_splits_heuristic(items, seq_kv, kv_tile=tile, workers=workers)


def test_at_least_one_and_at_most_half_the_tiles():
    for items, seq_kv, workers in GRID:
        n = heuristic(items, seq_kv, workers)
        tiles = -(-seq_kv // TILE)
        assert isinstance(n, int)
        assert 1 <= n <= max(1, tiles // 2), (items, seq_kv, workers, n)


@pytest.mark.parametrize("items, workers", [(16, 16), (17, 16), (2, 2), (1000, 128)])
def test_no_split_when_the_items_fill_the_workers(items, workers):
    assert heuristic(items, 100_000, workers) == 1


@pytest.mark.parametrize("items, workers", [(1, 16), (1, 2), (2, 16), (3, 64), (15, 16)])
def test_few_items_are_split_until_every_worker_has_one(items, workers):
    n = heuristic(items, 100_000, workers)
    assert n > 1
    assert items * n >= workers
    assert items * (n - 1) < workers  # no more chunks than needed


def test_chunks_keep_two_tiles():
    # 5 tiles and 128 idle workers: still at most 5 // 2 chunks.
    assert heuristic(1, 5 * TILE, 128) == 2


@pytest.mark.parametrize("seq_kv", [0, 1, TILE, 3 * TILE])
def test_short_caches_are_not_split(seq_kv):
    assert heuristic(1, seq_kv, 128) == 1


def test_no_items_no_split():
    assert heuristic(0, 100_000, 128) == 1


WORK_ITEMS_CASES = {
    # name: (batch, seq_q, heads_q, heads_kv)
    "mla_decode": (1, 1, 16, 1),
    "mha_decode": (3, 1, 16, 16),
    "gqa_decode": (2, 1, 32, 8),
    "prefill": (2, 64, 16, 1),
    "mha_prefill": (1, 40, 4, 4),
}


@pytest.mark.parametrize("shape", WORK_ITEMS_CASES.values(), ids=WORK_ITEMS_CASES.keys())
def test_work_items_scale_with_batch(shape):
    batch, seq_q, heads_q, heads_kv = shape
    work_items = _ffi.module("cpu").work_items
    n = work_items(batch, seq_q, heads_q, heads_kv)
    assert n >= 1
    assert work_items(2 * batch, seq_q, heads_q, heads_kv) == 2 * n
    assert work_items(batch, 4 * seq_q, heads_q, heads_kv) >= n


@pytest.mark.parametrize("shape", [(0, 1, 16, 1), (2, 0, 16, 1), (2, 1, 0, 1)])
def test_work_items_of_empty_problems(shape):
    assert _ffi.module("cpu").work_items(*shape) == 0


@pytest.mark.parametrize("given, seq_kv, expected", [
    (1, 10 * KV_TILE, 1), (3, 10 * KV_TILE, 3), (64, 10 * KV_TILE, 10), (64, 2 * KV_TILE + 1, 3),
    (5, 1, 1), (5, 0, 1)])
def test_given_num_splits_is_clamped_to_the_tiles(given, seq_kv, expected):
    assert _common.choose_num_splits(given, 1, 1, 16, 1, seq_kv) == expected


def test_default_num_splits_follows_the_heuristic(monkeypatch):
    monkeypatch.setattr(_common, "cpu_workers", lambda: 16)
    items = _ffi.module("cpu").work_items(1, 1, 16, 1)
    seq_kv = 100 * KV_TILE
    expected = heuristic(items, seq_kv, 16, tile=KV_TILE)
    assert expected > 1
    assert _common.choose_num_splits(None, 1, 1, 16, 1, seq_kv) == expected
