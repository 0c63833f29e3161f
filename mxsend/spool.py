"""The on-disk queue: acceptance from new/, durable per-recipient state, claims, holds.

Rules of this file (docs/spool.md has the full picture and the crash analysis):

- Every state change is one rename, one exclusive link, or one atomic replace (temp file,
  fsync, rename, fsync of the directory). Nothing is ever rewritten in place.
- A message is claimed by renaming its state file from queue/ (or hold/) into the
  claimant's own active/<owner>/ directory; a rename succeeds for exactly one process.
- Temporary files live in the writer's own directory and start with "." so that no
  scanner ever reads them.
- Nothing here logs: results are returned, and the daemon logs the contract's events.

The pieces it stands on: `durable` (steps, barriers, group commit, file primitives),
`queue_state` (the state values and their JSON), `recovery` (owners and what dead ones
held) and `spares` (reused inodes). All of their OS calls go through the `os` module
attribute (never `from os import`), so the crash test can interpose on them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from mxsend.acceptance import Accepted, Folders, Quarantined, accept_held_steps
from mxsend.config import SpoolConfig
from mxsend.durable import (
    FSYNC,
    Durability,
    GroupCommit,
    Steps,
    Sync,
    drive,
    free_name,
    move_noreplace,
    mtime,
    read_file,
    run_rolling,
)
from mxsend.envelope import Message, parse_bsmtp, serialise_bsmtp
from mxsend.errors import SpoolError
from mxsend.queue_state import (
    MessageState,
    RecipientState,
    RecipientStatus,
    state_from_json,
    state_to_json,
)
from mxsend.recovery import (
    OWNER_UNSAFE,
    Presence,
    Recovery,
    default_owner,
    live_owners,
    process_identity,
)
from mxsend.spares import Spares
from mxsend.spool_layout import (
    create_dirs,
    enqueue_steps,
    id_problem,
    new_queue_id,
)
from mxsend.spool_view import QueueView

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Claim:
    """A message's state file held in active/<owner>/ by this process."""

    id: str
    path: Path
    owner: str = field(default="")


def _checked(id: str) -> str:
    if "/" in id or "\0" in id or id in ("", ".", ".."):
        raise SpoolError(f"bad queue id {id!r}")
    return id


def _lost(id: str) -> SpoolError:
    return SpoolError(f"{id}: claim lost (presumed dead and recovered)")


class Spool(QueueView):
    """One process's handle on a spool directory shared with writers and other mxsends."""

    def __init__(
        self,
        root: Path,
        *,
        keep_sent: bool = False,
        max_message_size: int = 50 * 1024**2,
        owner: str | None = None,
        durable: Durability | None = None,
        group: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.group = group  # spool.group as a gid; None: the daemon's own group
        self._durable = durable or FSYNC
        self.keep_sent = keep_sent
        self.max_message_size = max_message_size
        if owner is not None and (not owner or OWNER_UNSAFE.search(owner)):
            raise ValueError(f"owner must be letters, digits, '.' and '-': {owner!r}")
        self.owner = owner or default_owner()
        self._presence = Presence(self.root, self.owner, self._durable)
        # The hot operations join plain strings: pathlib's `/` and str() were ~5% of the
        # daemon's CPU.
        root_str = os.fspath(self.root)
        self._new, self._msg, self._queue, self._hold, self._bad, self._sent = (
            os.path.join(root_str, name) for name in ("new", "msg", "queue", "hold", "bad",
                                                      "sent"))
        self._inbox = os.path.join(root_str, "incoming", self.owner)
        self._active = os.path.join(root_str, "active", self.owner)
        self._spares = Spares(self._active)
        self._folders = Folders(msg=self._msg, queue=self._queue, bad=self._bad)

    @classmethod
    def configured(cls, spool: SpoolConfig, **kwargs: Any) -> Spool:
        """The spool `[spool]` describes (every process opens it the same way)."""
        return cls(spool.path, keep_sent=spool.keep_sent,
                   max_message_size=spool.max_message_size, group=spool.group, **kwargs)

    def message_path(self, id: str) -> Path:
        """msg/ID, the accepted spool file (Lua's `Filename`)."""
        return self.root / "msg" / _checked(id)

    def message_file(self, id: str) -> str:
        """str(message_path(id)) without pathlib, for the per-message hot path."""
        return f"{self._msg}/{_checked(id)}"

    @property
    def group_commit(self) -> GroupCommit | None:
        """The group commit this spool's barriers go through, if any."""
        return self._durable if isinstance(self._durable, GroupCommit) else None

    # -- set-up and liveness

    def create_dirs(self) -> None:
        """Make the spool's folders, or put right the modes and group of ours that exist."""
        try:
            create_dirs(self.root, self.group)
            self._durable.directory(self.root)
        except OSError as exc:
            raise SpoolError(f"cannot create spool directories in {self.root}: {exc}") from exc

    def heartbeat(self) -> None:
        """Refresh owners/<owner>; others treat our claims as live while it is fresh."""
        self._presence.heartbeat()

    def live_owners(self, max_age: float, now: float) -> list[str]:
        """Owners whose heartbeat was refreshed within `max_age` seconds of `now`."""
        return live_owners(self.root, max_age, now)

    def retire(self) -> None:
        """Remove our heartbeat on a clean exit: anything we still hold is recovered at once."""
        self._spares.drop_all()
        self._presence.retire((self._active, self._inbox))

    def recover(self, stale_after: float, now: float) -> list[str]:
        """Take back what dead owners held (recovery.Recovery); the ids put right.

        An owner is dead when owners/<owner> is missing or older than `stale_after`.
        """
        recovery = Recovery(self.root, self.owner, self._durable, self._presence.register,
                            self._finish)
        return recovery.recover(stale_after, now)

    # -- acceptance from new/

    def incoming(self) -> list[str]:
        """Names waiting in new/, oldest first; dot-files are the writers' business."""
        try:
            with os.scandir(self._new) as it:
                found = [(mtime(e), e.name) for e in it if not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        return [name for _, name in sorted(found)]

    def accept(self, name: str, now: float) -> Accepted | Quarantined | None:
        """Take new/NAME: queue it (due now) or quarantine it; None if someone else took it."""
        return drive(self.accept_steps(name, now), self._durable)

    def accept_steps(self, name: str, now: float) -> Steps[Accepted | Quarantined | None]:
        """accept() as steps, for run_rolling."""
        if "/" in name or name in ("", ".", "..") or name.startswith("."):
            return None
        inbox = self._inbox
        try:
            # The claim: exactly one process's rename succeeds (contract §1).
            if not self._presence.move_in(f"{self._new}/{name}", inbox, name):
                return None
            held = f"{inbox}/{name}"
            try:
                return (yield from accept_held_steps(name, held, now, self._folders,
                                                     self.max_message_size, self._spares))
            except OSError:
                # Hand it back rather than keep it in our incoming/ until we die.
                with contextlib.suppress(OSError):
                    move_noreplace(held, self._new, free_name(self._new, name))
                raise
        except OSError as exc:
            raise SpoolError(f"cannot accept {name}: {exc}") from exc

    # -- claims

    def claim(self, id: str) -> Claim | None:
        """Move queue/ID into active/<owner>/; None if it is not there (someone else has it)."""
        return self._claim_from(self._queue, id)

    def claim_held(self, id: str) -> Claim | None:
        """Move hold/ID into active/<owner>/; None if it is not held."""
        return self._claim_from(self._hold, id)

    def _claim_from(self, folder: str, id: str) -> Claim | None:
        active = self._active
        try:
            if not self._presence.move_in(f"{folder}/{_checked(id)}", active, id):
                return None
        except OSError as exc:
            raise SpoolError(f"cannot claim {id}: {exc}") from exc
        # No directory fsync: if a power loss undoes the claim, the message is simply
        # where it was, which is the state recovery would have restored anyway.
        return Claim(id=id, path=Path(f"{active}/{id}"), owner=self.owner)

    def read(self, claim: Claim) -> MessageState:
        try:
            return state_from_json(read_file(os.fspath(claim.path)))
        except FileNotFoundError:
            raise _lost(claim.id) from None
        except OSError as exc:
            raise SpoolError(f"{claim.id}: cannot read state: {exc}") from exc

    def load_message(self, id: str) -> Message:
        """Parse msg/ID; SpoolError if it is gone, EnvelopeError if it no longer parses."""
        path = f"{self._msg}/{_checked(id)}"
        try:
            raw = read_file(path, sized=True)
        except OSError as exc:
            raise SpoolError(f"{id}: cannot read message: {exc}") from exc
        return parse_bsmtp(raw)

    def update(self, claim: Claim, state: MessageState) -> None:
        """Make `state` durable; the message stays claimed."""
        drive(self.update_steps(claim, state), self._durable)

    def update_steps(self, claim: Claim, state: MessageState) -> Steps[None]:
        """update() as steps, for run_rolling."""
        yield from self._write_claimed(claim, state)

    def release(self, claim: Claim, state: MessageState) -> None:
        """Make `state` durable and put the message back into queue/, due at next_try
        (into hold/ if `state.held`)."""
        drive(self.release_steps(claim, state), self._durable)

    def release_steps(self, claim: Claim, state: MessageState) -> Steps[None]:
        """release() as steps, for run_rolling."""
        # The new state is the record once it is durable; the move to queue/ follows.
        yield from self._write_claimed(claim, state, recorded=True)
        path = os.fspath(claim.path)
        folder = self._hold if state.held else self._queue
        try:
            os.rename(path, f"{folder}/{claim.id}")
            yield Sync(directory=folder, also=os.path.dirname(path))
        except FileNotFoundError:
            raise _lost(claim.id) from None
        except OSError as exc:
            raise SpoolError(f"{claim.id}: cannot release: {exc}") from exc

    def complete(self, claim: Claim, state: MessageState) -> None:
        """Every recipient is final: record that, then remove the message (or keep it in sent/)."""
        drive(self.complete_steps(claim, state), self._durable)

    def complete_steps(self, claim: Claim, state: MessageState) -> Steps[None]:
        """complete() as steps, for run_rolling."""
        if not state.is_final():
            raise SpoolError(f"{claim.id}: complete() with recipients still pending")
        # No final state is written: the message file goes first, and a claimed state
        # without its message is what recovery reads as an interrupted removal and
        # drops (as for delete()). That saves a write and two barriers per message.
        path = os.fspath(claim.path)
        if not os.path.exists(path):
            raise _lost(claim.id)  # presumed dead: the message is someone else's now
        try:
            yield from self._finish(claim.id, path)
        except OSError as exc:
            raise SpoolError(f"{claim.id}: cannot complete: {exc}") from exc

    def delete(self, claim: Claim) -> None:
        """Remove a claimed message without a bounce (queue delete)."""
        try:
            # Message first, then state: a state without its message is recognised by
            # recovery as an interrupted removal and dropped.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.message_path(claim.id))
            self._durable.directory(self.root / "msg")
            os.unlink(claim.path)
            self._durable.directory(claim.path.parent)
        except FileNotFoundError:
            raise _lost(claim.id) from None
        except OSError as exc:
            raise SpoolError(f"{claim.id}: cannot delete: {exc}") from exc

    def _finish(self, id: str, state_path: str | Path) -> Steps[None]:
        message = f"{self._msg}/{_checked(id)}"
        if self.keep_sent:
            moved = True
            try:
                move_noreplace(message, self._sent, free_name(self._sent, id))
            except FileNotFoundError:
                moved = False
            if moved:
                yield Sync(directory=self._sent)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(message)
        # The message is gone for good: it can never be sent again. That is the record
        # (a state left without its message is an interrupted removal to recovery).
        yield Sync(directory=self._msg, recorded=True)
        if not self._spares.keep(os.fspath(state_path)):
            os.unlink(state_path)
        yield Sync(directory=os.path.dirname(state_path))

    def _write_claimed(self, claim: Claim, state: MessageState, *,
                       recorded: bool = False) -> Steps[None]:
        if state.id != claim.id:
            raise SpoolError(f"state of {state.id} written to the claim of {claim.id}")
        # A process presumed dead has had its directory taken away: refuse rather than
        # resurrect a claim someone else now holds (a new rename would recreate it).
        path = os.fspath(claim.path)
        if not os.path.exists(path):
            raise _lost(claim.id)
        try:
            yield from self._spares.replace_steps(path, state_to_json(state), state.next_try,
                                                  recorded=recorded)
        except FileNotFoundError:
            raise _lost(claim.id) from None
        except OSError as exc:
            raise SpoolError(f"{claim.id}: cannot write state: {exc}") from exc

    # -- holds (the queue CLI)

    def hold(self, id: str) -> MessageState | None:
        """Move queue/ID to hold/ID, where no scan finds it: never attempted until
        unhold(). Its state, or None if it is not in queue/ (in flight, held or gone).

        The claim, then the state with `held` (so that recovery of a claim cut short
        puts it back on hold), then the rename into hold/: docs/spool.md, "Hold".
        """
        claim = self.claim(id)
        if claim is None:
            return None
        return self._release_as(claim, held=True)

    def unhold(self, id: str) -> MessageState | None:
        """Move hold/ID back to queue/ID, due at its next_try (at once if that has
        passed). Its state, or None if it is not on hold."""
        claim = self.claim_held(id)
        if claim is None:
            return None
        return self._release_as(claim, held=False)

    def _release_as(self, claim: Claim, *, held: bool) -> MessageState:
        state = replace(self.read(claim), held=held)
        self.release(claim, state)
        return state

    # -- writers

    def enqueue(self, message: Message, *, name: str | None = None) -> str:
        """Hand a message to the spool by the writers' protocol; return its queue id."""
        return self.enqueue_bytes(serialise_bsmtp(message), name=name)

    def enqueue_bytes(self, raw: bytes, *, name: str | None = None) -> str:
        """tmp/ -> write, fsync -> link into new/ -> fsync new/ (contract §1)."""
        return drive(self.enqueue_steps(raw, name=name), self._durable)

    def enqueue_steps(self, raw: bytes, *, name: str | None = None) -> Steps[str]:
        """enqueue_bytes() as steps, for run_rolling."""
        return enqueue_steps(self.root, raw, self.owner, name)

    def run_rolling(
        self,
        take: Callable[[bool], list[tuple[Steps[Any], T]]],
        done: Callable[[list[tuple[T, object]]], None],
    ) -> None:
        """durable.run_rolling with this spool's barriers (the daemon's I/O thread)."""
        run_rolling(take, done, self._durable)


__all__ = [
    "Accepted",
    "Claim",
    "Durability",
    "GroupCommit",
    "MessageState",
    "Quarantined",
    "RecipientState",
    "RecipientStatus",
    "Spool",
    "Steps",
    "id_problem",
    "new_queue_id",
    "process_identity",
    "state_from_json",
    "state_to_json",
]
