"""``explorer serve`` with a trace of what its event loop does: where a click waits in a burst.

Usage::

    python benchmarks/trace_serve.py TRACE.log serve [explorer serve's arguments]
    python benchmarks/trace_serve.py --summary TRACE.log

The first form runs ``explorer serve`` in this process with hooks around the app's own
gate and builder (nothing in ``explorer`` changes), appending one line per event to
``TRACE.log``, each starting with ``time.monotonic()``:

- ``request-wait`` / ``request-start CPU`` / ``request-end CPU``: a page request queued at
  the app's :class:`~explorer.app.main.PageGate`, let in, and its document built and sent
  (``CPU``: the process's CPU seconds then);
- ``message-start`` / ``message-end CPU``: a websocket message (a click, a page's first
  pull) from its first frame until its last one is handled;
- ``step PRIORITY WALL CPU``: one part of a page built by the builder;
- ``stall SECONDS CPU``: the event loop did not run its 20 ms timer for that long;
- ``stack SECONDS`` and the main thread's last frames: written by a watchdog thread while
  the loop stalls over 0.4 s. If the watchdog writes nothing during a long stall, the
  whole process was not running (no CPU share), not busy.

``bench_app.py --load N --trace TRACE.log`` serves through this script. The second form
prints each page request's wall and CPU seconds and the stalls over 0.3 s, relative to the
second page request (the start of a burst after the first page).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

#: the loop's timer period and the stall worth a line, and a stack (seconds)
_TICK_S, _STALL_S, _STACK_S = 0.02, 0.15, 0.4


def install(path: Path) -> None:
    """Wrap the app's gate, builder and event loop so that they log to ``path``."""
    from explorer.app import collector, main

    out = path.open("a", buffering=1)

    def log(text: str) -> None:
        out.write(f"{time.monotonic():.3f} {text}\n")

    gate = main.PageGate
    enter, leave, started, done = gate.enter, gate.leave, gate.message_started, gate.message_done

    async def traced_enter(self: Any) -> None:
        log("request-wait")
        await enter(self)
        log(f"request-start {time.process_time():.3f}")

    def traced_leave(self: Any) -> None:
        log(f"request-end {time.process_time():.3f}")
        leave(self)

    def traced_started(self: Any) -> None:
        log("message-start")
        started(self)

    def traced_done(self: Any) -> None:
        done(self)
        log(f"message-end {time.process_time():.3f}")

    gate.enter, gate.leave = traced_enter, traced_leave
    gate.message_started, gate.message_done = traced_started, traced_done

    def timed(step: Any, priority: int) -> Any:
        def run() -> None:
            wall, cpu = time.monotonic(), time.process_time()
            try:
                step()
            finally:
                log(f"step {priority} {time.monotonic() - wall:.3f} {time.process_time() - cpu:.3f}")

        return run

    builder = main._Builder  # noqa: SLF001 - a benchmark's hook
    add, add_page = builder.add, builder.add_page
    def traced_add(self: Any, life: Any, step: Any, *, priority: int = 0) -> None:
        add(self, life, timed(step, priority), priority=priority)

    def traced_add_page(self: Any, life: Any, steps: list[tuple[Any, int]]) -> None:
        add_page(self, life, [(timed(step, priority), priority) for step, priority in steps])

    builder.add, builder.add_page = traced_add, traced_add_page

    collect = collector.collect_when_idle

    def traced_collect(io_loop: Any = None) -> Any:
        from tornado.ioloop import PeriodicCallback

        last = [time.monotonic()]

        def tick() -> None:
            now = time.monotonic()
            if now - last[0] > _STALL_S:
                log(f"stall {now - last[0]:.3f} {time.process_time():.3f}")
            last[0] = now

        PeriodicCallback(tick, _TICK_S * 1e3).start()
        loop_thread = threading.get_ident()

        def watch() -> None:
            while True:
                time.sleep(0.1)
                behind = time.monotonic() - last[0]
                if behind > _STACK_S:
                    frame = sys._current_frames().get(loop_thread)  # noqa: SLF001
                    stack = "".join(traceback.format_stack(frame)[-8:]) if frame is not None else "?\n"
                    log(f"stack {behind:.2f}\n{stack}")

        threading.Thread(target=watch, name="trace-watchdog", daemon=True).start()
        return collect(io_loop)

    collector.collect_when_idle = traced_collect


def summary(path: Path) -> str:
    """Page requests (wall / CPU s) and stalls over 0.3 s, in seconds from the second request."""
    events = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].replace(".", "", 1).isdigit():  # noqa: PLR2004
            events.append((float(parts[0]), parts[1], parts[2:]))
    starts = [t for t, kind, _ in events if kind == "request-start"]
    t0 = starts[1] if len(starts) > 1 else (starts[0] if starts else 0.0)
    rows, opened = [], None
    for t, kind, rest in events:
        if kind == "request-start":
            opened = (t, float(rest[0]))
        elif kind == "request-end" and opened is not None:
            wall, cpu = t - opened[0], float(rest[0]) - opened[1]
            rows.append(f"{opened[0] - t0:8.2f}  page request  wall {wall:.3f}  CPU {cpu:.3f}")
            opened = None
        elif kind == "stall" and float(rest[0]) > 0.3:  # noqa: PLR2004
            rows.append(f"{t - t0:8.2f}  loop stalled {float(rest[0]):.3f} s (ending here)")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--summary":  # noqa: PLR2004
        print(summary(Path(argv[1])))
        return 0
    if len(argv) < 2 or argv[1] != "serve":  # noqa: PLR2004
        print("\n\n".join(__doc__.split("\n\n")[1:3]), file=sys.stderr)
        return 2
    install(Path(argv[0]))
    from explorer.cli import main as explorer_main

    return explorer_main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
