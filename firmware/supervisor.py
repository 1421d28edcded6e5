"""Supervision: the one owner of the status LED, and the watchdog kicker.

The LED says what the gateway is doing (booting, ready, holding, queue full, fault); only this
module decides which, from the queue, the store and the relay, and every change is logged.

The watchdog is kicked from a thread, and only while the event loop still answers (a task in the
loop keeps a heartbeat) and every supervised service is alive. A service that stops, or a loop
blocked past `stall_seconds`, stops the kicks and is logged, so the hardware reboots a stuck
gateway. A service that stops also brings the whole gateway down with it: nothing keeps
answering SMTP with half its services gone.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Awaitable, Callable

import trio

from board import Board

__all__ = ["ServiceStopped", "Supervisor", "led_state"]

log = logging.getLogger("matte.supervisor")


class ServiceStopped(Exception):
    """A supervised service returned although it should serve until cancelled."""


def led_state(*, booting: bool, store_fault: bool, upstream_down_for: float | None,
              upstream_fault_seconds: float, full: bool, held: int) -> str:
    """What the LED shows; the first that applies wins."""
    if booting:
        return "booting"
    if store_fault or (upstream_down_for is not None
                       and upstream_down_for >= upstream_fault_seconds):
        return "fault"
    if full:
        return "queue-full"  # S10
    if held:
        return "holding"
    return "ready"


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


class Supervisor:
    def __init__(self, board: Board, *, kick_seconds: float = 1.0, stall_seconds: float = 10.0,
                 upstream_fault_seconds: float = 300.0,
                 now: Callable[[], float] = time.time) -> None:
        self._board = board
        self.kick_seconds = kick_seconds
        self.stall_seconds = stall_seconds
        self.upstream_fault_seconds = upstream_fault_seconds
        self._now = now  # the relay's clock: "unreachable since" is read on it
        self._booting = True
        self._led: str | None = None
        self._queue: Any = None
        self._store: Any = None
        self._upstream_down_since: float | None = None  # on `now`, set by watch_connect
        self._store_errors_seen = 0
        self._store_batches_seen = 0
        self._store_fault = False
        # Shared with the kicker thread: plain assignments of immutable values only.
        self._beat = time.monotonic()
        self._dead: tuple[str, ...] = ()
        self._stopped_because: str | None = None
        self._kick_lock = threading.Lock()  # one decision at a time, loop or kicker thread
        self.kicks = 0
        self.refusals = 0  # kicks withheld because something was unhealthy
        self.kick_stops = 0  # how often kicking stopped (0 in a healthy gateway)

    # -- the LED ----------------------------------------------------------------------------

    def watch(self, *, queue: Any, store: Any = None) -> None:
        """Where the LED's state comes from: the HoldQueue and the wal.Log under it."""
        self._queue = queue
        self._store = store

    def watch_connect(self, connect: Callable[[str, int], Awaitable[Any]]
                      ) -> Callable[[str, int], Awaitable[Any]]:
        """`connect` (how the relay opens upstream connections), noting whether the upstream
        can be reached: unreachable longer than upstream_fault_seconds shows "fault"."""

        async def observed(host: str, port: int) -> Any:
            try:
                stream = await connect(host, port)
            except Exception:
                if self._upstream_down_since is None:
                    log.warning("upstream %s:%d unreachable", host, port)
                    self._upstream_down_since = self._now()
                raise
            if self._upstream_down_since is not None:
                log.info("upstream %s:%d reachable again", host, port)
                self._upstream_down_since = None
            return stream

        return observed

    def ready(self) -> None:
        """Boot is over: every service is up."""
        self._booting = False
        self.show()

    def show(self) -> None:
        """Decide the LED again (the queue calls this on every change)."""
        self._check_store()
        since = self._upstream_down_since
        state = led_state(
            booting=self._booting,
            store_fault=self._store_fault,
            upstream_down_for=None if since is None else self._now() - since,
            upstream_fault_seconds=self.upstream_fault_seconds,
            full=self._queue is not None and self._queue.is_full(),
            held=self._queue.held_count() if self._queue is not None else 0,
        )
        if state != self._led:
            log.info("LED: %s -> %s", self._led or "off", state)
            self._led = state
            self._board.set_led(state)

    @property
    def led(self) -> str | None:
        return self._led

    def _check_store(self) -> None:
        """A store error shows "fault" until the store writes a batch again (or forever once it
        refuses writes)."""
        if self._store is None:
            return
        stats = self._store.statistics()
        errors, batches = stats.get("write_errors", 0), stats.get("batches", 0)
        if stats.get("broken") or errors > self._store_errors_seen:
            self._store_fault = True
        elif batches > self._store_batches_seen:
            self._store_fault = False
        self._store_errors_seen, self._store_batches_seen = errors, batches

    # -- services ---------------------------------------------------------------------------

    async def supervise(self, name: str, service: Callable[..., Awaitable[Any]], *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run `service` (a startable function); if it ever stops, stop the kicks and raise."""
        try:
            await service(task_status=task_status)
        except BaseException as exc:
            if _only_cancelled(exc):
                raise  # shutting down
            self._died(name, f"{type(exc).__name__}: {exc}")
            raise
        self._died(name, "returned")
        raise ServiceStopped(f"service {name} stopped")

    def _died(self, name: str, why: str) -> None:
        log.critical("service %s stopped (%s): the gateway goes down", name, why)
        with self._kick_lock:
            self._dead = (*self._dead, name)
        self._kick_once(time.monotonic())  # decide now: the kicker may be stopped before it looks

    # -- the watchdog -----------------------------------------------------------------------

    def health(self, monotonic_now: float) -> str | None:
        """None when healthy, else why the watchdog must not be kicked."""
        if self._dead:
            return f"service {', '.join(self._dead)} stopped"
        blocked = monotonic_now - self._beat
        if blocked > self.stall_seconds:
            return f"event loop blocked for {blocked:.1f} s"
        return None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The heartbeat (in the loop) and the kicker (a thread), until cancelled."""
        stop = threading.Event()
        kicker = threading.Thread(target=self._kick_until, args=(stop,), name="watchdog",
                                  daemon=True)
        self._beat = time.monotonic()
        self._kick_once(self._beat)  # the watchdog may have been armed a while ago, at open
        kicker.start()
        try:
            task_status.started()
            while True:
                self._beat = time.monotonic()
                self.show()  # time-based: the upstream may just have been down long enough
                await trio.sleep(self.kick_seconds / 2)
        finally:
            stop.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(kicker.join)

    def _kick_until(self, stop: threading.Event) -> None:
        while not stop.wait(self.kick_seconds):
            self._kick_once(time.monotonic())

    def _kick_once(self, monotonic_now: float) -> None:
        with self._kick_lock:
            self._decide(monotonic_now)

    def _decide(self, monotonic_now: float) -> None:
        why = self.health(monotonic_now)
        if why is not None:
            self.refusals += 1
            if self._stopped_because is None:
                self.kick_stops += 1
                log.critical("watchdog kicks stop: %s", why)
            self._stopped_because = why
            return
        if self._stopped_because is not None:
            log.warning("watchdog kicks resume (stopped because %s)", self._stopped_because)
            self._stopped_because = None
        self._board.kick_watchdog()
        self.kicks += 1

    def statistics(self) -> dict:
        return {"led": self._led, "kicks": self.kicks, "refusals": self.refusals,
                "kick_stops": self.kick_stops,
                "dead_services": list(self._dead)}
