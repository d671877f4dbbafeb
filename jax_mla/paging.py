"""PageAllocator: the host-side bookkeeping of a paged KV cache.

A paged cache is one pool of num_pages pages of page_size rows shared by all
sequences; a sequence's block table row lists its pages in order, so its
position t lives in row t % page_size of page table[t // page_size]
(docs/design.md, "Paged caches"). The allocator hands pages out as sequences
grow, takes a finished sequence's pages back for reuse, and builds the int32
block tables the ops, cache_update and the DeepSeek layer take. It is plain
Python on the host: no kernel, no device array.
"""

from __future__ import annotations

import heapq
import numbers
from collections.abc import Hashable, Sequence

import numpy as np
from jax.typing import DTypeLike

from jax_mla.quant import cache_bytes

__all__ = ["PageAllocator"]


def _positive_int(where: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    return int(value)


class PageAllocator:
    """Pages of one paged cache, handed out to sequences as they grow.

    Args:
      num_pages: pages in the pool (the cache's leading axis).
      page_size: rows per page (the cache's second axis).
      max_pages: block table columns, the most pages one sequence may hold
        (its capacity is max_pages * page_size tokens); default num_pages.

    Sequences are named by any hashable id. Free pages are handed out lowest
    index first, so a freed page is the next one reused.
    """

    # Block table entries past a sequence's pages (and rows of empty slots).
    # It is no page: a position that reaches it is never read (the ops skip
    # it) and never written (cache_update drops it, or raises when concrete).
    UNUSED = -1

    def __init__(self, num_pages: int, page_size: int, max_pages: int | None = None):
        self.num_pages = _positive_int("PageAllocator", "num_pages", num_pages)
        self.page_size = _positive_int("PageAllocator", "page_size", page_size)
        self.max_pages = (
            self.num_pages
            if max_pages is None
            else _positive_int("PageAllocator", "max_pages", max_pages)
        )
        self._free = list(range(self.num_pages))  # a heap
        self._pages: dict[Hashable, list[int]] = {}

    @property
    def max_len(self) -> int:
        """The most tokens one sequence can hold: max_pages * page_size."""
        return self.max_pages * self.page_size

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def pages_free(self) -> int:
        return len(self._free)

    def __contains__(self, seq: Hashable) -> bool:
        return seq in self._pages

    def pages(self, seq: Hashable) -> list[int]:
        """The pages of sequence `seq`, in position order."""
        if seq not in self._pages:
            raise KeyError(f"PageAllocator: no sequence {seq!r}")
        return list(self._pages[seq])

    def pages_needed(self, seq: Hashable, length: int) -> int:
        """How many more pages `seq` (new or not) needs to hold `length` tokens."""
        have = len(self._pages.get(seq, ()))
        return max(0, -(-int(length) // self.page_size) - have)

    def can_reserve(self, seq: Hashable, length: int) -> bool:
        """Whether reserve(seq, length) would succeed."""
        return 0 <= length <= self.max_len and self.pages_needed(seq, length) <= self.pages_free

    def reserve(self, seq: Hashable, length: int) -> list[int]:
        """Makes `seq` hold at least `length` tokens' pages, taking free pages
        as needed (a new seq starts with none); returns its pages. Never
        shrinks a sequence. Raises ValueError when `length` exceeds max_len
        and RuntimeError when the pool has too few free pages (then nothing
        is taken)."""
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
            raise ValueError(f"PageAllocator.reserve: length must be an int >= 0, got {length!r}")
        if length > self.max_len:
            raise ValueError(
                f"PageAllocator.reserve: length {length} exceeds max_len {self.max_len} "
                f"({self.max_pages} pages of {self.page_size})"
            )
        need = self.pages_needed(seq, length)
        if need > self.pages_free:
            raise RuntimeError(
                f"PageAllocator.reserve: sequence {seq!r} needs {need} more pages for "
                f"{length} tokens, only {self.pages_free} of {self.num_pages} are free"
            )
        pages = self._pages.setdefault(seq, [])
        pages.extend(heapq.heappop(self._free) for _ in range(need))
        return list(pages)

    def free(self, seq: Hashable) -> None:
        """Returns the pages of a finished sequence to the pool."""
        if seq not in self._pages:
            raise KeyError(f"PageAllocator.free: no sequence {seq!r}")
        for page in self._pages.pop(seq):
            heapq.heappush(self._free, page)

    def block_table(self, seqs: Sequence[Hashable | None]) -> np.ndarray:
        """int32 [len(seqs), max_pages]: row b lists the pages of seqs[b] in
        order, then UNUSED (-1); a None entry (an empty batch slot) is a row
        of UNUSED."""
        table = np.full((len(seqs), self.max_pages), self.UNUSED, np.int32)
        for b, seq in enumerate(seqs):
            if seq is not None:
                pages = self.pages(seq)
                table[b, : len(pages)] = pages
        return table

    def bytes_in_use(self, fmt: str | DTypeLike, row_shape: Sequence[int]) -> int:
        """Bytes of the pages in use, for rows of `row_shape` stored as `fmt`
        (a float dtype or a quantized format name; jax_mla.cache_bytes)."""
        return cache_bytes(fmt, (self.pages_in_use, self.page_size, *row_shape))
