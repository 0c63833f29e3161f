"""The due plan: which queued messages this daemon knows of and when each is due. Pure.

A heap of (when, queue id) with lazy deletion: scheduling a message again supersedes its
earlier entry, which is dropped when it reaches the top. The plan is rebuilt from queue/
at every full rescan (other processes and the queue CLI change queue/ too) and kept
between rescans, so that 100,000 deferred messages cost nothing while they wait.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterable


class DuePlan:
    def __init__(self) -> None:
        self._when: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._when

    def schedule(self, queue_id: str, when: float) -> None:
        """`queue_id` is due at `when` (epoch seconds); any earlier plan for it is void."""
        self._when[queue_id] = when
        heapq.heappush(self._heap, (when, queue_id))

    def replace(self, queued: Iterable[tuple[float, str]]) -> None:
        """Start over from a listing of queue/: (next try, queue id) pairs."""
        self._heap = list(queued)
        self._when = {queue_id: when for when, queue_id in self._heap}
        heapq.heapify(self._heap)

    def take_due(self, now: float, limit: int, busy: Container[str] = ()) -> list[str]:
        """Up to `limit` ids due at `now`, earliest first; each leaves the plan.

        An id in `busy` (claimed by this daemon already) leaves the plan without being
        returned: whoever holds the claim schedules it again when it lets go.
        """
        due: list[str] = []
        while self._heap and len(due) < limit:
            when, queue_id = self._heap[0]
            if self._when.get(queue_id) != when:
                heapq.heappop(self._heap)  # superseded by a later schedule()
                continue
            if when > now:
                break
            heapq.heappop(self._heap)
            del self._when[queue_id]
            if queue_id not in busy:
                due.append(queue_id)
        return due

    def next_due(self) -> float | None:
        """When the earliest planned message is due; None with nothing planned."""
        while self._heap and self._when.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None
