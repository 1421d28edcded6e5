"""The hold queue: the one owner of every stored message's state (S1, S7, S10, B2, B4).

State is derived from the log on boot and kept in memory. Every change is a record committed to the
log first (fsync done), applied second, so what the page shows and what a restart recovers agree.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import trio

from firmware import policy
from firmware.credentials import KeyStore
from firmware.netaddr import normalize_ip
from firmware.wal import Accept, Finish, Log, Recovered, StoreError, Update

log = logging.getLogger("matte.qmgr")

HELD = "held"  # waiting for its release time; the page lists it
RELEASING = "releasing"  # its release record is being committed
RELEASED = "released"  # handed to delivery
CANCELLING = "cancelling"  # its cancel record is being committed

# A release the store could not record is tried again after this long.
RELEASE_RETRY_SECONDS = 5
# How far a single extend may push a hold (B4): one day.
MAX_EXTEND_SECONDS = 86400
# A message received more than this far in the future was timed by a clock that has since gone
# back (set right by NTP after a boot without a real-time clock): its deadline cannot be trusted.
CLOCK_SLACK_SECONDS = 60.0


class WallClock:
    """Absolute time that advances with trio's clock, so tests' autojump moves it too."""

    def __init__(self) -> None:
        self._offset = time.time() - trio.current_time()

    def __call__(self) -> float:
        return trio.current_time() + self._offset


@dataclass(frozen=True)
class HeldView:
    """What the page and the API may see of a held message: never its body (S6)."""

    id: bytes
    client_ip: str
    sender: str
    from_: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc_count: int
    subject: str
    size: int
    received_at: float
    release_at: float


@dataclass
class Message:
    id: bytes
    client_ip: str
    sender: str
    recipients: tuple[str, ...]
    summary: dict
    size: int
    received_at: float
    release_at: float
    held: bool
    mail_options: dict = field(default_factory=dict)
    state: str = HELD
    released_at: float | None = None
    delivered_to: tuple[str, ...] = ()
    # Delivery's part (issue: AUTH passthrough, routes, bounces): opaque to the queue.
    credentials: dict | None = None  # sealed by firmware.credentials, never plaintext
    destination: tuple | None = None  # transparent mode: (host, port, tls) intercepted
    failed: dict = field(default_factory=dict)  # recipient -> [code, text], for the bounce
    # A line of the body starts with "." (see EndOfData): without one, the stored bytes go
    # upstream as they are. Unknown (a store written before it was kept) counts as True.
    dot_lines: bool = True

    def meta(self) -> dict:
        return {
            "ip": self.client_ip,
            "from": self.sender,
            "rcpt": list(self.recipients),
            "sum": self.summary,
            "recv": self.received_at,
            "rel": self.release_at,
            "held": self.held,
            "opt": self.mail_options,
            "dots": self.dot_lines,
            **({"cred": self.credentials} if self.credentials else {}),
            **({"dst": list(self.destination)} if self.destination else {}),
        }

    @classmethod
    def from_meta(cls, id: bytes, size: int, meta: dict) -> "Message":
        msg = cls(
            id=id,
            client_ip=meta["ip"],
            sender=meta["from"],
            recipients=tuple(meta["rcpt"]),
            summary=meta["sum"],
            size=size,
            received_at=meta["recv"],
            release_at=meta["rel"],
            held=meta["held"],
            mail_options=meta.get("opt", {}),
            credentials=meta.get("cred"),
            destination=tuple(meta["dst"]) if meta.get("dst") else None,
            dot_lines=meta.get("dots", True) is not False,
        )
        if "released" in meta:
            msg.apply({"released": meta["released"]})
        return msg

    def apply(self, changes: dict) -> None:
        if "rel" in changes:
            self.release_at = changes["rel"]
        if "released" in changes:
            self.state = RELEASED
            self.released_at = changes["released"]
        if "delivered" in changes:
            self.delivered_to = self.delivered_to + tuple(changes["delivered"])
        if "failed" in changes:
            self.failed = {**self.failed, **changes["failed"]}

    def view(self) -> HeldView:
        s = self.summary
        to, cc = tuple(s.get("to", ())), tuple(s.get("cc", ()))
        visible = {a.lower() for a in to + cc}
        bcc = sum(1 for r in self.recipients if r.lower() not in visible)
        return HeldView(
            id=self.id,
            client_ip=self.client_ip,
            sender=self.sender,
            from_=s.get("from", ""),
            to=to,
            cc=cc,
            bcc_count=bcc,
            subject=s.get("subject", ""),
            size=self.size,
            received_at=self.received_at,
            release_at=self.release_at,
        )


@dataclass(frozen=True)
class Delivery:
    """One released message handed to the relay: what it needs and nothing it may change."""

    id: bytes
    sender: str
    recipients: tuple[str, ...]  # those not yet delivered
    size: int
    mail_options: dict
    released_at: float
    credentials: dict | None = None
    destination: tuple | None = None
    failed: dict = field(default_factory=dict)  # recipient -> [code, text] so far
    received_at: float = 0.0
    dot_lines: bool = True  # see Message.dot_lines


class Reservation:
    """Room in the store for one message being received; gives it back when closed."""

    def __init__(self, queue: "HoldQueue", size_hint: int) -> None:
        self._queue = queue
        self.bytes = size_hint
        self.open = True

    def grow(self, size: int) -> None:
        if size > self.bytes:
            self._queue._reserved_bytes += size - self.bytes
            self.bytes = size

    def close(self) -> None:
        if self.open:
            self.open = False
            self._queue._reserved_messages -= 1
            self._queue._reserved_bytes -= self.bytes


class HoldQueue:
    def __init__(
        self,
        store: Log,
        *,
        hold_seconds: float,
        max_messages: int,
        max_bytes: int,
        now: Callable[[], float] | None = None,
        audit=None,
        on_change: Callable[[], None] | None = None,
        keys: KeyStore | None = None,
    ) -> None:
        self._log = store
        # Wrapped keys of sealed credentials (B9), outside the log; without a key store the
        # sealed credentials go into the log whole.
        self._keys = keys
        self.hold_seconds = hold_seconds
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._now = now or WallClock()
        self._audit = audit
        self._on_change_hook = on_change or (lambda: None)
        self._change_version = 0  # bumped on every change the page can see (live updates)
        self._changed = trio.Event()
        self._messages: dict[bytes, Message] = {}
        self._bytes = 0
        self._held_count = 0  # messages on the page: kept, as the LED asks on every change
        self._reserved_messages = 0
        self._reserved_bytes = 0
        self._timers: list[tuple[float, bytes]] = []
        self._wakeup = trio.Event()
        send, receive = trio.open_memory_channel(math.inf)
        self._to_relay: trio.MemorySendChannel[Delivery] = send
        self.deliveries: trio.MemoryReceiveChannel[Delivery] = receive
        self.counters = dict.fromkeys(
            ["accepted", "held", "passed", "released", "cancelled", "sent_now", "extended",
             "delivered", "deferred", "failed"], 0)

    # -- boot ---------------------------------------------------------------------------------

    def now(self) -> float:
        """The queue's wall clock: received_at and release_at are on it. It keeps its offset
        from the monotonic clock while running, so a step of the system clock (NTP on a
        board without a real-time clock) neither shortens nor stretches a hold."""
        return self._now()

    def recover(self, recovered: dict[bytes, Recovered], on_boot: str) -> int:
        """Rebuild state from the log (S7, B2). Returns how many messages came back."""
        now = self._now()
        for id, rec in recovered.items():
            msg = Message.from_meta(id, rec.accept.size, rec.accept.meta)
            for update in rec.updates:
                msg.apply(update.changes)
            self._add(msg)
        misdated = 0
        for msg in list(self._messages.values()):
            future = msg.received_at > now + CLOCK_SLACK_SECONDS
            if future and msg.state is not RELEASED:
                misdated += 1
            if msg.state is RELEASED or on_boot == "send" or msg.release_at <= now or future:
                # Released before the restart, S7's "all held mail is sent at once on boot",
                # or held by a clock that was wrong (sent as S7 would, rather than held for
                # as long as the clock was off).
                self._release_now(msg, msg.released_at or now)
            else:
                self._schedule(msg)
        if misdated:
            log.warning("%d held message(s) were received at a time still to come: the clock "
                        "has gone back since, so their holds cannot be trusted; sent now", misdated)
        if self._messages:
            log.info("recovered %d message(s), on_boot=%s", len(self._messages), on_boot)
        return len(self._messages)

    async def remove_orphan_keys(self) -> int:
        """After recover(), before any mail is accepted: remove the key files of messages that
        are not held (finished just before a crash, or never accepted), B9."""
        if self._keys is None:
            return 0
        return await trio.to_thread.run_sync(self._keys.remove_all_but, set(self._messages))

    # -- capacity (S10) -----------------------------------------------------------------------

    def usage(self) -> policy.Usage:
        return policy.Usage(
            messages=len(self._messages) + self._reserved_messages,
            bytes=self._bytes + self._reserved_bytes,
            max_messages=self.max_messages,
            max_bytes=self.max_bytes,
        )

    def reserve(self, size_hint: int = 0) -> Reservation | policy.Reply:
        """Room for one more message, or the 452 to answer (nothing is taken then)."""
        refusal = policy.check_capacity(self.usage(), size_hint)
        if refusal is not None:
            return refusal
        self._reserved_messages += 1
        self._reserved_bytes += size_hint
        return Reservation(self, size_hint)

    def held_count(self) -> int:
        return self._held_count

    def is_full(self) -> bool:
        u = self.usage()
        return u.messages >= u.max_messages or u.bytes >= u.max_bytes

    # -- receiving ----------------------------------------------------------------------------

    @property
    def store(self) -> Log:
        return self._log

    async def write_body(self, id: bytes, offset: int, data: bytes) -> None:
        await self._log.write_body(id, offset, data)

    def discard(self, id: bytes) -> None:
        """A body that will never be accepted: its space can be reclaimed."""
        self._log.abandon(id)

    async def accept(
        self,
        id: bytes,
        *,
        client_ip: str,
        sender: str,
        recipients: tuple[str, ...],
        summary: dict,
        size: int,
        hold: bool,
        mail_options: dict,
        dot_lines: bool = True,
        credentials: dict | None = None,
        destination: tuple | None = None,
        reservation: Reservation | None = None,
    ) -> Message:
        """Make a received message durable (the caller answers 250 only after this returns).

        The message takes over `reservation`'s room in the same step, so it is never counted
        twice (the LED would flicker to "queue full" and back)."""
        if credentials is not None and self._keys is not None:
            # The wrapped key is durable in its own file before the record that needs it.
            credentials = await self._keys.keep(id, credentials)
        try:
            return await self._accept(id, client_ip=client_ip, sender=sender,
                                      recipients=recipients, summary=summary, size=size,
                                      hold=hold, mail_options=mail_options,
                                      dot_lines=dot_lines,
                                      credentials=credentials, destination=destination,
                                      reservation=reservation)
        except BaseException:
            if credentials is not None:
                # Not accepted (or not known to be): its key goes now, else on the next boot.
                with trio.CancelScope(shield=True):
                    await self._destroy_key(id)
            raise

    async def _accept(self, id: bytes, *, client_ip: str, sender: str,
                      recipients: tuple[str, ...], summary: dict, size: int, hold: bool,
                      mail_options: dict, dot_lines: bool, credentials: dict | None,
                      destination: tuple | None, reservation: Reservation | None) -> Message:
        now = self._now()
        msg = Message(
            id=id,
            client_ip=normalize_ip(client_ip),
            sender=sender,
            recipients=recipients,
            summary=summary,
            size=size,
            received_at=now,
            release_at=now + self.hold_seconds if hold else now,
            held=hold,
            mail_options=mail_options,
            dot_lines=dot_lines,
            credentials=credentials,
            destination=destination,
        )
        meta = msg.meta()
        if not hold:
            # Passed at once (S2, S9): released in the same record, one fsync.
            msg.apply({"released": now})
            meta["released"] = now
        await self._log.commit(Accept(id, size, meta))
        if reservation is not None:
            reservation.close()
        self._add(msg)
        self.counters["accepted"] += 1
        self.counters["held" if hold else "passed"] += 1
        self._record("accept", msg, held=hold, size=size, recipients=len(recipients))
        if hold:
            self._schedule(msg)
        else:
            self.counters["released"] += 1
            self._release_now(msg, now)
            self._record("release", msg, why="pass")
        self._on_change()
        return msg

    # -- the page's actions -------------------------------------------------------------------

    def held_for(self, ip: str) -> list[HeldView]:
        ip = normalize_ip(ip)
        mine = [m for m in self._messages.values()
                if m.held and m.state is HELD and m.client_ip == ip]
        return [m.view() for m in sorted(mine, key=lambda m: m.received_at)]

    def _held_by(self, id: bytes, ip: str) -> Message | None:
        msg = self._messages.get(id)
        if msg is None or msg.state is not HELD or msg.client_ip != normalize_ip(ip):
            return None
        return msg

    async def cancel(self, id: bytes, ip: str) -> bool:
        msg = self._held_by(id, ip)
        if msg is None:
            return False
        # Taken out of the timers' reach before the await, so a confirmed cancel is never sent.
        self._set_state(msg, CANCELLING)
        try:
            await self._log.commit(Finish(id, "cancelled"))
        except BaseException:
            self._set_state(msg, HELD)
            self._schedule(msg)
            raise
        await self._destroy_key_of(msg)  # before it leaves: gone from the queue, gone from disk
        self._remove(msg)
        self.counters["cancelled"] += 1
        self._record("cancel", msg)
        self._on_change()
        return True

    async def send_now(self, id: bytes, ip: str) -> bool:
        msg = self._held_by(id, ip)
        if msg is None:
            return False
        await self._release(msg, "send-now")
        self.counters["sent_now"] += 1
        self._record("send-now", msg)
        return True

    async def extend(self, id: bytes, ip: str, seconds: int) -> bool:
        msg = self._held_by(id, ip)
        if msg is None or not 0 < seconds <= MAX_EXTEND_SECONDS:
            return False
        before = msg.release_at
        # Applied before the await so the old timer cannot fire meanwhile; undone if not durable.
        msg.release_at = max(before, self._now()) + seconds
        try:
            await self._log.commit(Update(id, {"rel": msg.release_at}))
        except BaseException:
            msg.release_at = before
            raise
        finally:
            self._schedule(msg)
        self.counters["extended"] += 1
        self._record("extend", msg, seconds=seconds, release_at=msg.release_at)
        self._on_change()
        return True

    def store_status(self) -> dict:
        return {
            "messages": len(self._messages),
            "bytes": self._bytes,
            "max_messages": self.max_messages,
            "max_bytes": self.max_bytes,
        }

    def statistics(self) -> dict:
        return {**self.counters, **self.store_status(),
                "held_now": self.held_count(),
                "store": self._log.statistics()}

    # -- change notification (the live page) -------------------------------------------------

    @property
    def change_version(self) -> int:
        return self._change_version

    async def wait_changed(self, seen: int) -> int:
        """Wait until something changed after version `seen`; returns the current version."""
        while self._change_version == seen:
            await self._changed.wait()
        return self._change_version

    def _on_change(self) -> None:
        self._change_version += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        self._on_change_hook()

    # -- delivery's side ----------------------------------------------------------------------

    def read_body(self, id: bytes) -> AsyncIterator[bytes]:
        return self._log.read_body(id)

    def open_body(self, id: bytes):
        """The body where it lies in the store (see Log.open_body)."""
        return self._log.open_body(id)

    def is_pending(self, id: bytes) -> bool:
        """False once the message is finished (e.g. cancelled just before its release)."""
        return id in self._messages

    async def delivered(self, id: bytes, recipients: tuple[str, ...]) -> None:
        """Some recipients are done; remember it so a restart does not send to them again."""
        msg = self._messages.get(id)
        if msg is None or not recipients:
            return
        await self._log.commit(Update(id, {"delivered": list(recipients)}))
        msg.apply({"delivered": list(recipients)})

    async def failed(self, id: bytes, failures: dict[str, list]) -> None:
        """Some recipients failed for good (recipient -> [code, text]); kept for the bounce,
        so a restart neither retries them nor forgets to bounce them."""
        msg = self._messages.get(id)
        if msg is None or not failures:
            return
        await self._log.commit(Update(id, {"failed": failures}))
        msg.apply({"failed": failures})

    async def finish(self, id: bytes, outcome: str, **details) -> None:
        """Delivery is over: "delivered", "bounced" (a bounce went to the sender) or "failed"
        (no bounce: a null sender, or the bounce itself failed). Once the Finish record is
        durable, the message's key file is destroyed, and with it its credentials (B9)."""
        msg = self._messages.get(id)
        if msg is None:
            return
        await self._log.commit(Finish(id, outcome))
        await self._destroy_key_of(msg)
        if self._messages.get(id) is msg:
            self._remove(msg)
        self.counters["delivered" if outcome == "delivered" else "failed"] += 1
        self._record({"delivered": "delivery", "bounced": "bounce"}.get(outcome, "undeliverable"),
                     msg, **details)
        self._on_change()

    def note_deferred(self, id: bytes, reason: str) -> None:
        self.counters["deferred"] += 1
        msg = self._messages.get(id)
        if msg is not None:
            self._record("defer", msg, reason=reason)

    # -- the timer task -----------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Release held mail when its time comes."""
        task_status.started()
        while True:
            self._wakeup = trio.Event()
            now = self._now()
            while self._timers and self._timers[0][0] <= now:
                release_at, id = heapq.heappop(self._timers)
                msg = self._messages.get(id)
                if msg is not None and msg.state is HELD and msg.release_at == release_at:
                    try:
                        await self._release(msg, "timer")
                    except StoreError as exc:
                        # Still held (and scheduled again): try later rather than stop, since
                        # a restart would send every held message at once (S7).
                        log.error("could not release %s: %s; trying again in %d s",
                                  id.hex(), exc, RELEASE_RETRY_SECONDS)
                        await trio.sleep(RELEASE_RETRY_SECONDS)
                now = self._now()
            delay = self._timers[0][0] - now if self._timers else math.inf
            with trio.move_on_after(delay):
                await self._wakeup.wait()

    # -- internals ----------------------------------------------------------------------------

    def _add(self, msg: Message) -> None:
        self._messages[msg.id] = msg
        self._bytes += msg.size
        self._held_count += msg.held and msg.state is HELD

    def _remove(self, msg: Message) -> None:
        del self._messages[msg.id]
        self._bytes -= msg.size
        self._held_count -= msg.held and msg.state is HELD

    def _set_state(self, msg: Message, state: str) -> None:
        """Every state change of a stored message goes through here, to keep the count."""
        if msg.held and self._messages.get(msg.id) is msg:
            self._held_count += (state is HELD) - (msg.state is HELD)
        msg.state = state

    async def _destroy_key_of(self, msg: Message) -> None:
        """Crypto-shredding (B9): called once the message's Finish record is durable."""
        if msg.credentials is not None:
            with trio.CancelScope(shield=True):  # bounded: an unlink and a directory sync
                await self._destroy_key(msg.id)

    async def _destroy_key(self, id: bytes) -> None:
        if self._keys is not None:
            await self._keys.destroy(id)

    def _schedule(self, msg: Message) -> None:
        heapq.heappush(self._timers, (msg.release_at, msg.id))
        if self._timers[0][0] >= msg.release_at:
            # Only a new earliest release changes when the timer task must wake: waking it
            # for every accepted message costs a task switch each.
            self._wakeup.set()

    async def _release(self, msg: Message, why: str) -> None:
        if msg.state is not HELD:
            return
        self._set_state(msg, RELEASING)
        now = self._now()
        try:
            await self._log.commit(Update(msg.id, {"released": now, "why": why}))
        except BaseException:
            self._set_state(msg, HELD)
            self._schedule(msg)
            raise
        self._release_now(msg, now)
        self.counters["released"] += 1
        self._record("release", msg, why=why)
        self._on_change()

    def _release_now(self, msg: Message, released_at: float) -> None:
        self._set_state(msg, RELEASED)
        msg.released_at = released_at
        done = set(msg.delivered_to) | set(msg.failed)
        pending = tuple(r for r in msg.recipients if r not in done)
        self._to_relay.send_nowait(
            Delivery(msg.id, msg.sender, pending, msg.size, msg.mail_options, released_at,
                     msg.credentials, msg.destination, dict(msg.failed), msg.received_at,
                     msg.dot_lines))

    def _record(self, event: str, msg: Message, **fields) -> None:
        if self._audit is not None:
            self._audit.write(event, id=msg.id.hex(), ip=msg.client_ip, sender=msg.sender,
                              **fields)
