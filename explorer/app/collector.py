"""Python's garbage collector in the served process: full collections while no one waits.

At 10^6 cells the served process holds about 540,000 objects the cyclic collector tracks
(modules, the dataset's AnnData and pandas objects, what every page shares), nearly all
of them for as long as the server runs. CPython 3.11 runs a full collection when ten
collections of the middle generation have passed since the last one and the objects that
reached the oldest generation since then number a quarter of those that were there
before: while pages were used that came every ~7 s, each 0.10-0.39 s over all those
objects, and a gene click that came then waited for it (the longest clicks, 0.6 server
CPU-s against 0.15).

:func:`collect_when_idle` (called once by :func:`explorer.app.server.serve`, before the
server runs its event loop) changes three things in its process:

1. One collection, then :func:`gc.freeze`: the objects made until then (the modules, the
   loaded dataset, what every page shares; no session exists yet) are never gone over
   again. A full collection then covers only the sessions' objects and what was imported
   later (torch, ~134,000 objects, when the server imports it in the background): 20-40
   CPU-ms at 10^6 cells with a page open, 90-140 with torch, instead of 0.13-0.44 CPU-s
   (measured on a loaded machine).
2. Automatic full collections need :data:`FULL_COLLECTION_THRESHOLD` middle-generation
   collections instead of Python's 10. With the long-lived objects frozen, the quarter
   rule counts only the sessions' objects and fired far more often while a burst of
   pages was built: a freeze alone made 8-page bursts slower.
3. Full collections on the event loop while the process is idle (under 5% of a core,
   the loop not late, no page request or websocket message in hand or just handled):
   after 0.5 s of quiet once CPython's own count for one has passed (about every ten
   gene clicks), and after 2 s of quiet if anything ran since the last one (the user
   stopped clicking, sessions closed). The garbage of clicks and of closed sessions is
   freed between clicks, without waiting for the raised threshold.

A click that arrives during an idle collection waits for it (tens of milliseconds with
the long-lived objects frozen); one that arrives while clicks keep the server busy no
longer meets a full collection over the whole heap. The raised threshold still bounds
the garbage that can pile up while the server is never idle.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from tornado.ioloop import IOLoop, PeriodicCallback

logger = logging.getLogger(__name__)

#: middle-generation collections between automatic full collections (CPython's default
#: is 10); ten times as many, since idle collections do most of the work
FULL_COLLECTION_THRESHOLD = 100
#: seconds between the idle checks on the event loop
TICK_S = 0.25
#: a tick is idle when the process used under this share of one core's time over it
#: (Bokeh's own periodic work uses well under 1%; a click 0.1-0.2 CPU-s)
IDLE_CPU_SHARE = 0.05
#: a tick that comes this many tick lengths late found the event loop busy: not idle
LATE_FACTOR = 1.5
#: a short quiet (0.5 s) is used for a full collection once this many middle-generation
#: collections have passed since the last one (CPython's own trigger, less its quarter
#: rule): about every ten gene clicks, not after each (each costs the collection's
#: 40-50 ms of CPU at 10^6 cells, and a click that comes during it waits)
IDLE_PENDING = 10
#: consecutive idle ticks for that short quiet
IDLE_TICKS = 2
#: consecutive idle ticks (2 s) after which whatever happened since the last full
#: collection is collected: the user has stopped clicking, or sessions have closed
QUIET_TICKS = 8


class IdleCollector:
    """Decide, tick by tick, when a full collection will not delay anyone.

    Call :meth:`tick` every ``tick_s`` seconds on the event loop. A tick is idle when the
    process used under ``idle_cpu_share`` of a core since the previous one, the tick
    came on time and ``busy()`` is false. It runs ``collect`` after ``idle_ticks`` consecutive idle ticks if
    ``idle_pending`` middle-generation collections have passed since the last full one,
    and after ``quiet_ticks`` if anything happened since then (a busy tick, or any
    middle-generation collection). The collection's own CPU time does not count against
    the next tick.

    Parameters
    ----------
    tick_s, idle_cpu_share, idle_pending, idle_ticks, quiet_ticks
        See :data:`TICK_S`, :data:`IDLE_CPU_SHARE`, :data:`IDLE_PENDING`,
        :data:`IDLE_TICKS`, :data:`QUIET_TICKS`.
    clock, cpu
        Wall and process CPU clocks in seconds (tests pass their own).
    collect
        Runs a full collection.
    pending
        Middle-generation collections since the last full one (``gc.get_count()[2]``).
    busy
        Whether the server is handling pages now, whatever its CPU says (on a machine
        whose cores other processes keep busy, a starved server building pages uses
        little CPU per second): a tick that finds it so is not idle.

    Examples
    --------
    >>> wall, cpu, runs = [0.0], [0.0], []
    >>> c = IdleCollector(clock=lambda: wall[0], cpu=lambda: cpu[0], collect=lambda: runs.append(wall[0]),
    ...                   pending=lambda: 1)
    >>> for _ in range(10):
    ...     wall[0] += 0.25
    ...     _ = c.tick()
    >>> runs
    [2.0]
    """

    def __init__(
        self,
        *,
        tick_s: float = TICK_S,
        idle_cpu_share: float = IDLE_CPU_SHARE,
        idle_pending: int = IDLE_PENDING,
        idle_ticks: int = IDLE_TICKS,
        quiet_ticks: int = QUIET_TICKS,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
        collect: Callable[[], object] = gc.collect,
        pending: Callable[[], int] = lambda: gc.get_count()[2],
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        if tick_s <= 0 or not 0 < idle_cpu_share < 1 or not 1 <= idle_ticks <= quiet_ticks:
            msg = (
                "Expected tick_s > 0, 0 < idle_cpu_share < 1 and 1 <= idle_ticks <= quiet_ticks; found "
                f"tick_s={tick_s!r}, idle_cpu_share={idle_cpu_share!r}, idle_ticks={idle_ticks!r}, "
                f"quiet_ticks={quiet_ticks!r}."
            )
            raise ValueError(msg)
        self.tick_s, self.idle_cpu_share = tick_s, idle_cpu_share
        self.idle_pending, self.idle_ticks, self.quiet_ticks = idle_pending, idle_ticks, quiet_ticks
        self._clock, self._cpu, self._collect, self._pending, self._busy = clock, cpu, collect, pending, busy
        self._wall_at, self._cpu_at = clock(), cpu()
        self._quiet = 0
        self._busy_since_collection = True
        #: full collections run and their total wall seconds (what the log reports)
        self.collections = 0
        self.collect_s = 0.0
        self._checks: PeriodicCallback | None = None

    def tick(self) -> bool:
        """Note whether the process was idle since the last tick; collect if it is time (returns whether)."""
        wall, cpu = self._clock(), self._cpu()
        elapsed, used = wall - self._wall_at, cpu - self._cpu_at
        idle = (
            elapsed <= LATE_FACTOR * self.tick_s
            and used <= self.idle_cpu_share * max(elapsed, 1e-9)
            and not self._busy()
        )
        self._quiet = self._quiet + 1 if idle else 0
        self._busy_since_collection = self._busy_since_collection or not idle
        collected = False
        if self._quiet >= self.idle_ticks:
            pending = self._pending()
            if pending >= self.idle_pending or (
                self._quiet >= self.quiet_ticks and (self._busy_since_collection or pending > 0)
            ):
                self._collect()
                took = self._clock() - wall
                self.collections += 1
                self.collect_s += took
                logger.debug("idle full collection: %.1f ms", took * 1e3)
                self._quiet = 0
                self._busy_since_collection = False
                collected = True
        # measured from now: the collection's own CPU does not make the next tick busy
        self._wall_at, self._cpu_at = self._clock(), self._cpu()
        return collected

    def start(self, io_loop: IOLoop | None = None) -> None:
        """Run :meth:`tick` every ``tick_s`` on ``io_loop`` (default: the current loop) until :meth:`stop`."""
        from tornado.ioloop import IOLoop, PeriodicCallback

        self.stop()
        checks = self._checks = PeriodicCallback(self.tick, self.tick_s * 1e3)

        def begin() -> None:
            if self._checks is checks:  # not stopped meanwhile
                checks.start()

        # started from the loop itself, so it runs there whichever thread calls this
        (io_loop or IOLoop.current()).add_callback(begin)

    def stop(self) -> None:
        """End the checks (a collection already running finishes)."""
        if self._checks is not None:
            self._checks.stop()
            self._checks = None


def collect_when_idle(io_loop: IOLoop | None = None) -> IdleCollector:
    """Freeze the process's long-lived objects, raise the full-collection threshold, collect when idle.

    For a process that serves the app and keeps what it holds now (modules, the loaded
    dataset) until it exits; call it before the first session exists, since what is frozen
    is never collected. See the module's docstring for what changes and why.

    Parameters
    ----------
    io_loop
        The server's event loop (default: the current one); the idle checks run on it.

    Returns
    -------
    The :class:`IdleCollector`, its checks started (``stop()`` ends them; the freeze and
    the threshold stay).
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_THRESHOLD)
    collector = IdleCollector(busy=_pages_in_use)
    collector.start(io_loop)
    return collector


def _pages_in_use() -> bool:
    """Whether a page request is waiting or being built, or a websocket message was handled within a tick.

    From the server's :data:`explorer.app.main.page_gate`, through which ``explorer serve``
    passes every page request and websocket message.
    """
    from explorer.app.main import page_gate

    recent = time.monotonic() - page_gate.last_message < TICK_S
    return bool(page_gate.waiting) or page_gate.quiet_in() > 0 or recent
