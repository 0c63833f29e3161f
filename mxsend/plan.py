"""The due plan: which queued messages this daemon knows of and when each is due. Pure.

Two lanes, each a heap of (when, queue id) with lazy deletion: scheduling a message again
supersedes its earlier entry, which is dropped when it reaches the top.

- The **fresh** lane holds messages just accepted from new/; the **queue** lane every
  other (retries, what a rescan of queue/ found, recovered claims). `take_due` takes
  from the two in turn, as Postfix's queue manager alternates between its incoming and
  deferred queues, so that a retry sweep of a big queue (a million messages due at once
  after an outage or a `queue flush`) cannot starve new mail: new mail waits for at
  most half of a batch, never for the sweep (issue 16 item 7).
- The plan is **bounded**: it holds at most `limit` messages, the earliest due. A rescan
  of queue/ keeps only the earliest `limit` (`Spool.queued_earliest`), and the plan
  remembers the earliest due time it left out (`complete_until`): it knows every queued
  message due before that. A million messages deferred for a week cost the plan the
  memory of `limit`, not a million entries in each daemon. When the plan has drained
  what it knows and `complete_until` has come, `wants_rescan` asks for the next rescan.

The plan is rebuilt from queue/ at every full rescan (other processes and the queue CLI
change queue/ too) and kept between rescans. A rescan of a big queue takes seconds, and
the daemon dispatches meanwhile: what the plan learns of a message after the listing
began (`begin_rescan`: it was taken, or scheduled again) is newer than what the listing
says of it, so `replace` keeps that, not the listing's due time, which would have a
message just deferred attempted again at once.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterable

INF = float("inf")
# Entries kept (per daemon). Each costs ~200 bytes; 50,000 is ~10 MB, and a retry
# sweep drains it in about a minute at the daemon's rate, so a rescan (a second or two
# of CPU for a million files) is needed at most once a minute.
PLAN_LIMIT = 50_000
FRESH, QUEUE = 0, 1


class DuePlan:
    def __init__(self, limit: int = PLAN_LIMIT) -> None:
        self.limit = limit
        # queue id -> (when, lane) of its one valid entry
        self._when: dict[str, tuple[float, int]] = {}
        self._heaps: tuple[list[tuple[float, str]], list[tuple[float, str]]] = ([], [])
        # Every queued message due before this is in the plan (see the module's text).
        self.complete_until = INF
        self._turn = FRESH
        # Ids taken or scheduled since the listing in progress began (None: no listing).
        self._since_listing: set[str] | None = None

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._when

    def schedule(self, queue_id: str, when: float, *, fresh: bool = False) -> None:
        """`queue_id` is due at `when` (epoch seconds); any earlier plan for it is void.

        `fresh`: just accepted from new/ (the fresh lane). A message due at or after
        `complete_until` is left to the rescan that will find it in queue/.
        """
        if self._since_listing is not None:
            self._since_listing.add(queue_id)
        if when >= self.complete_until and not fresh:
            self._when.pop(queue_id, None)
            return
        lane = FRESH if fresh else QUEUE
        self._when[queue_id] = (when, lane)
        heapq.heappush(self._heaps[lane], (when, queue_id))
        if len(self._when) > 2 * self.limit or len(self._heaps[QUEUE]) > 4 * self.limit:
            self._trim()

    def begin_rescan(self) -> None:
        """A listing of queue/ for `replace` begins now (see the module's text)."""
        self._since_listing = set()

    def end_rescan(self) -> None:
        """The listing failed: no `replace` follows."""
        self._since_listing = None

    def replace(self, queued: Iterable[tuple[float, str]], rest: float | None = None) -> None:
        """Start over from a listing of queue/: (next try, queue id) pairs; `rest` is the
        earliest next try of the messages the listing left out (None: none left out).

        The fresh lane is kept: its messages are in queue/ (so in the listing, once), or
        were accepted while the listing was being made; either way they stay at the front.
        So is what the plan learnt of a message since `begin_rescan`: the listing may
        have seen it before it was taken or scheduled again.
        """
        newer = self._since_listing or set()
        self._since_listing = None
        kept = [(when, queue_id, lane) for queue_id, (when, lane) in self._when.items()
                if lane == FRESH or queue_id in newer]
        heap = [(when, queue_id) for when, queue_id in queued if queue_id not in newer]
        self.complete_until = INF if rest is None else rest
        self._when = {queue_id: (when, QUEUE) for when, queue_id in heap}
        fresh: list[tuple[float, str]] = []
        for when, queue_id, lane in kept:
            self._when[queue_id] = (when, lane)
            (fresh if lane == FRESH else heap).append((when, queue_id))
        heapq.heapify(heap)
        heapq.heapify(fresh)
        self._heaps = (fresh, heap)
        if len(self._when) > self.limit:
            self._trim()

    def _trim(self) -> None:
        """Keep the `limit` earliest; what is dropped is left to the next rescan."""
        keep = heapq.nsmallest(self.limit, ((when, lane, queue_id) for queue_id, (when, lane)
                                            in self._when.items()))
        kept = {queue_id for _, _, queue_id in keep}
        dropped = min((when for queue_id, (when, _) in self._when.items()
                       if queue_id not in kept), default=INF)
        self.complete_until = min(self.complete_until, dropped)
        self._when = {queue_id: (when, lane) for when, lane, queue_id in keep}
        self._heaps = ([], [])
        for when, lane, queue_id in keep:
            self._heaps[lane].append((when, queue_id))
        for heap in self._heaps:
            heapq.heapify(heap)

    def _top(self, lane: int) -> tuple[float, str] | None:
        heap = self._heaps[lane]
        while heap:
            when, queue_id = heap[0]
            if self._when.get(queue_id) == (when, lane):
                return heap[0]
            heapq.heappop(heap)  # superseded by a later schedule()
        return None

    def take_due(self, now: float, limit: int, busy: Container[str] = (), *,
                 fresh_limit: int | None = None, queue_limit: int | None = None
                 ) -> list[str]:
        """Up to `limit` ids due at `now` (at most `fresh_limit` of them from the fresh
        lane, `queue_limit` from the queue lane), the lanes in turn, each lane earliest
        first; each leaves the plan.

        An id in `busy` (claimed by this daemon already) leaves the plan without being
        returned: whoever holds the claim schedules it again when it lets go.
        """
        due: list[str] = []
        taken = [0, 0]
        limits = [limit if fresh_limit is None else fresh_limit,
                  limit if queue_limit is None else queue_limit]
        dry = [False, False]
        lane = self._turn
        while len(due) < limit and not (dry[FRESH] and dry[QUEUE]):
            top = None if dry[lane] or taken[lane] >= limits[lane] else self._top(lane)
            if top is None or top[0] > now:
                dry[lane] = True
            else:
                heapq.heappop(self._heaps[lane])
                del self._when[top[1]]
                if self._since_listing is not None:
                    self._since_listing.add(top[1])
                if top[1] not in busy:
                    due.append(top[1])
                    taken[lane] += 1
            lane = 1 - lane
        self._turn = lane
        return due

    def next_due(self, *, rest: bool = True, queue: bool = True) -> float | None:
        """When the earliest planned message is due (or, with `rest`, the plan runs out
        of what it knows: `complete_until`); None with nothing planned. Without `queue`,
        only new mail counts (the queue lane has no room to go to)."""
        tops = (self._top(FRESH), self._top(QUEUE) if queue else None)
        times = [top[0] for top in tops if top is not None]
        if rest and self.complete_until < INF:
            times.append(self.complete_until)
        return min(times) if times else None

    def wants_rescan(self, now: float) -> bool:
        """The plan has left out messages that are due by now, and has drained most of
        what it holds: time to list queue/ again."""
        return self.complete_until <= now and len(self._when) < max(1, self.limit // 10)
