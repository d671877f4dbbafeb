"""The num_splits heuristic (jax_mla._splits.num_splits_heuristic) is a pure
function of the work items, the cache length, the KV tile and the worker
count: its properties, and those of the native plan's work_items() and of the
clamping in choose_num_splits, tested without running a kernel."""

from __future__ import annotations

import pytest

from jax_mla import _ffi, _splits

from .conftest import KV_TILE

TILE = 32
GRID = [
    (items, seq_kv, workers)
    for items in (0, 1, 2, 3, 8, 16, 100, 1000)
    for seq_kv in (0, 1, 31, 32, 33, 127, 128, 200, 4096, 100_000)
    for workers in (1, 2, 16, 128)
]


def heuristic(items, seq_kv, workers, tile=TILE):
    return _splits.num_splits_heuristic(items, seq_kv, kv_tile=tile, workers=workers)


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


@pytest.mark.parametrize(
    "shape, items",
    [
        # (batch, seq_q, heads_q, heads_kv): blocks of 128 rows once they still
        # make 64 items (the long-prefill cases of test_cpu_switches), else 32.
        ((1, 4096, 16, 16), 16 * 32),
        ((2, 3 * 128 + 37, 8, 8), 64),
        ((1, 16 * 42, 12, 4), 64),  # GQA 3: 42 positions x 3 heads
        ((2, 33 * 8 - 3, 16, 1), 66),  # MLA: 8 positions x 16 heads
        ((2, 3 * 128, 8, 8), 2 * 8 * 12),  # 48 items of 128: stays at 32 rows
        ((1, 64, 16, 16), 16 * 2),
    ],
)
def test_work_items_of_long_prefill(shape, items):
    assert _ffi.module("cpu").work_items(*shape) == items


@pytest.mark.parametrize("shape", [(0, 1, 16, 1), (2, 0, 16, 1), (2, 1, 0, 1)])
def test_work_items_of_empty_problems(shape):
    assert _ffi.module("cpu").work_items(*shape) == 0


@pytest.mark.parametrize(
    "given, seq_kv, expected",
    [
        (1, 10 * KV_TILE, 1),
        (3, 10 * KV_TILE, 3),
        (64, 10 * KV_TILE, 10),
        (64, 2 * KV_TILE + 1, 3),
        (5, 1, 1),
        (5, 0, 1),
    ],
)
def test_given_num_splits_is_clamped_to_the_tiles(given, seq_kv, expected):
    assert _splits.choose_num_splits(given, 1, 1, 16, 1, seq_kv) == expected


def test_default_num_splits_follows_the_heuristic(monkeypatch):
    monkeypatch.setattr(_splits, "cpu_workers", lambda: 16)
    items = _ffi.module("cpu").work_items(1, 1, 16, 1)
    seq_kv = 100 * KV_TILE
    expected = heuristic(items, seq_kv, 16, tile=KV_TILE)
    assert expected > 1
    assert _splits.choose_num_splits(None, 1, 1, 16, 1, seq_kv) == expected


# The CUDA heuristic (gpu_num_splits_heuristic): its wave count is that of the
# fewest splits filling 90% of the last wave; within it, the fewest tiles per
# block, with no split left without a tile.
GPU_GRID = [
    (items, seq_kv, sms)
    for items in (1, 2, 3, 16, 64, 100, 131, 132, 500)
    for seq_kv in (0, 31, 127, 128, 1000, 4096, 16384, 100_000)
    for sms in (1, 8, 132, 264)
]


def gpu_heuristic(items, seq_kv, sms, tile=TILE):
    return _splits.gpu_num_splits_heuristic(items, seq_kv, kv_tile=tile, sms=sms)


def test_gpu_splits_keep_two_tiles_and_leave_none_empty():
    for items, seq_kv, sms in GPU_GRID:
        n = gpu_heuristic(items, seq_kv, sms)
        tiles = -(-seq_kv // TILE)
        assert isinstance(n, int)
        assert 1 <= n <= max(1, tiles // 2), (items, seq_kv, sms, n)
        per = -(-tiles // n) if tiles else 0
        assert (n - 1) * per < max(tiles, 1), (items, seq_kv, sms, n)  # split n - 1 has a tile


@pytest.mark.parametrize("items, sms", [(132, 132), (500, 132), (264, 264)])
def test_gpu_no_split_when_the_blocks_fill_the_sms(items, sms):
    assert gpu_heuristic(items, 100_000, sms) == 1


@pytest.mark.parametrize(
    "items, seq_kv, sms, expected",
    [
        (1, 16384, 132, 128),  # B = 1, 16 heads: 128 blocks of 4 tiles, not 119 (103 of 5)
        (1, 16384, 264, 256),  # the same over q8_0 (two blocks per SM): 256 of 2, not 238
        (64, 4096, 132, 2),  # B = 64: two splits, as before
        (64, 16384, 132, 2),
        (100, 16384, 132, 5),  # 5 splits fill 4 waves (500 of 528): still 5
        (32, 1000, 132, 4),
    ],
)
def test_gpu_split_counts(items, seq_kv, sms, expected):
    assert gpu_heuristic(items, seq_kv, sms) == expected


def test_gpu_splits_never_add_a_wave_or_a_tile_per_block():
    # Against the fewest splits that fill 90% of the last wave (the rule
    # before the tiles per block were balanced).
    for items, seq_kv, sms in GPU_GRID:
        tiles = -(-seq_kv // TILE)
        if tiles < 4 or items >= sms:
            continue
        fill = {ns: items * ns / (-(-items * ns // sms) * sms) for ns in range(1, tiles // 2 + 1)}
        first = next((ns for ns, f in fill.items() if f >= 0.9), max(fill, key=fill.get))
        n = gpu_heuristic(items, seq_kv, sms)
        assert -(-items * n // sms) <= -(-items * first // sms), (items, seq_kv, sms, n, first)
        assert -(-tiles // n) <= -(-tiles // first), (items, seq_kv, sms, n, first)
