"""One rank's allocations over a run, in order, and what they add up to.

``Program`` collects allocation and free events (each with its size, a breakdown category and the
CUDA stream it was allocated on) and marks for named moments of the step. ``analyse`` replays them
once for ``max_memory_allocated`` (sizes rounded as the caching allocator rounds them), the moment
and breakdown of that peak and a timeline; ``peak_reserved`` replays them through the allocator
model for ``max_memory_reserved``.
"""

from __future__ import annotations

from dataclasses import dataclass

from profiling.allocator import CachingAllocator, round_size

# Breakdown categories, in the order reports list them.
CATEGORIES = (
    "parameters",
    "quantization_state",
    "unsharded_parameters",
    "gradients",
    "unsharded_gradients",
    "optimizer_states",
    "activations",
    "autocast_weight_copies",
    "temporaries",
    "quantization_scratch",
    "loss",
    "communication_buffers",
    "inputs",
    "cuda_runtime",
)

# The caching allocator reuses a freed block only on the stream it was allocated on. FSDP2 allocates
# its all-gather buffers on its copy-in stream and its reduce-scatter outputs on its own stream.
MAIN_STREAM, ALL_GATHER_STREAM, REDUCE_SCATTER_STREAM = 0, 1, 2


@dataclass
class Analysis:
    peak_allocated: int
    peak_moment: str
    breakdown: dict[str, int]  # live bytes by category at the peak
    timeline: list[tuple[str, int, int]]  # (moment, bytes allocated at its start, highest bytes within it)


class Program:
    def __init__(self):
        self.events: list[tuple] = []  # (key, +rounded size for an allocation / -size for a free, category, stream)
        self.marks: list[tuple[int, str]] = []  # (event index, moment)
        self.live: dict = {}  # key -> (size, category, stream)

    def alloc(self, key, nbytes: int, category: str, stream: int = MAIN_STREAM) -> None:
        self.push(key, round_size(nbytes), category, stream)

    def push(self, key, size: int, category: str, stream: int = MAIN_STREAM) -> None:
        """``alloc`` of an already rounded size."""
        if key in self.live:
            raise ValueError(f"allocation {key} is already live")
        self.live[key] = (size, category, stream)
        if size:  # an empty tensor asks the allocator for nothing
            self.events.append((key, size, category, stream))

    def free(self, key) -> None:
        size, category, stream = self.live.pop(key)
        if size:
            self.events.append((key, -size, category, stream))

    def free_all(self, keys) -> None:
        for key in keys:
            self.free(key)

    def live_keys(self, predicate) -> list:
        return [key for key in self.live if predicate(key)]

    def mark(self, moment: str) -> None:
        self.marks.append((len(self.events), moment))

    def analyse(self) -> Analysis:
        live, peak, peak_at = 0, -1, 0
        timeline, mark_i, current = [], 0, None
        for i, (_, size, _, _) in enumerate(self.events):
            while mark_i < len(self.marks) and self.marks[mark_i][0] <= i:
                current = [self.marks[mark_i][1], live, live]
                timeline.append(current)
                mark_i += 1
            live += size
            if current is not None and live > current[2]:
                current[2] = live
            if live > peak:
                peak, peak_at = live, i
        moment = next((m for at, m in reversed(self.marks) if at <= peak_at), "start")
        breakdown = dict.fromkeys(CATEGORIES, 0)
        for _, size, category, _ in self.events[: peak_at + 1]:
            breakdown[category] += size
        return Analysis(peak, moment, breakdown, [tuple(t) for t in timeline])

    def peak_reserved(self) -> int:
        allocator = CachingAllocator()
        ids: dict = {}
        for i, (key, size, _, stream) in enumerate(self.events):
            if size > 0:
                ids[key] = i
                allocator.malloc(i, size, stream)
            else:
                allocator.free(ids.pop(key))
        return allocator.peak_reserved
