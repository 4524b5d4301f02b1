"""The CUDA caching allocator's arithmetic: what a request counts in ``allocated`` and ``reserved``.

Constants and rules follow ``c10/cuda/CUDACachingAllocator.cpp`` (default settings, no expandable
segments): every request is rounded up to a multiple of 512 B (that rounded size is what
``max_memory_allocated`` counts); requests up to 1 MiB come from the small pool, carved out of
2 MiB segments; larger ones from the large pool, where a request under 10 MiB opens a 20 MiB
segment and a bigger one a segment of its own size rounded up to 2 MiB. A free block is reused
best-fit within its pool and stream, split when the rest is worth keeping (any rest in the small
pool, over 1 MiB in the large pool), and merged with free neighbours of its segment. Cached
segments are never given back (trainkit never calls ``empty_cache``), so ``reserved`` only grows.
"""

from __future__ import annotations

import bisect
import itertools

MIN_BLOCK = 512
SMALL_REQUEST = 1 << 20  # up to this: small pool
SMALL_SEGMENT = 2 << 20
LARGE_SEGMENT = 20 << 20  # for large-pool requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(nbytes: int) -> int:
    """Bytes a request of ``nbytes`` occupies in ``allocated`` (0 for an empty tensor: no request)."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """Bytes ``cudaMalloc``'d when no cached block fits a request of (rounded) ``size``."""
    if size <= SMALL_REQUEST:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class Block:
    __slots__ = ("size", "pool", "prev", "next", "free", "serial")

    def __init__(self, size: int, pool: tuple, prev=None, next=None):
        self.size, self.pool, self.prev, self.next = size, pool, prev, next
        self.free, self.serial = False, 0


class CachingAllocator:
    """Replays allocations and frees and tracks the reserved bytes the caching allocator would hold.

    Blocks of a segment form a doubly linked list, as in the allocator; each (stream, pool) keeps
    its free blocks sorted by (size, serial) for the best-fit lookup.
    """

    def __init__(self):
        self.reserved = 0
        self.peak_reserved = 0
        self._free: dict[tuple, list] = {}  # (stream, small pool?) -> sorted [(size, serial, Block)]
        self._used: dict[int, Block] = {}  # request id -> block
        self._serial = itertools.count()

    def malloc(self, request: int, nbytes: int, stream: int = 0) -> None:
        size = round_size(nbytes)
        if size == 0:
            return
        small = size <= SMALL_REQUEST
        pool = (stream, small)
        free = self._free.setdefault(pool, [])
        i = bisect.bisect_left(free, (size, -1))
        if i < len(free):
            block = free.pop(i)[2]
        else:
            block = Block(segment_size(size), pool)
            self.reserved += block.size
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        block.free = False
        rest = block.size - size
        if (rest >= MIN_BLOCK) if small else (rest > SMALL_REQUEST):
            tail = Block(rest, pool, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = tail
            block.next, block.size = tail, size
            self._release(tail)
        self._used[request] = block

    def free(self, request: int) -> None:
        block = self._used.pop(request, None)
        if block is None:
            return
        for neighbour in (block.next, block.prev):
            if neighbour is not None and neighbour.free:
                self._unlist(neighbour)
                if neighbour is block.next:
                    block.size += neighbour.size
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
                else:
                    neighbour.size += block.size
                    neighbour.next = block.next
                    if block.next is not None:
                        block.next.prev = neighbour
                    block = neighbour
        self._release(block)

    def _release(self, block: Block) -> None:
        block.free, block.serial = True, next(self._serial)
        bisect.insort(self._free[block.pool], (block.size, block.serial, block))

    def _unlist(self, block: Block) -> None:
        free = self._free[block.pool]
        del free[bisect.bisect_left(free, (block.size, block.serial))]
