"""One small memoising helper: results by key, the least recently used dropped beyond a bound.

The session's state keeps what a click would otherwise recompute (a gene's column, the
time bins, the arrow grid, the agreement of two fits) in a :class:`Memo`; what every
session showing the same dataset would compute alike lives in the dataset's shared memo
(:func:`shared_memo`), dropped with the dataset.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable

T = TypeVar("T")


class Memo:
    """Remember up to ``max_items`` results by key; the least recently used is dropped first.

    Thread-safe: a fit's callbacks and the page may ask at once. A value is computed
    outside the lock, so two threads asking :meth:`get` for the same missing key may both
    compute it (the last one is kept); :meth:`get_once` waits for the first instead.

    Examples
    --------
    >>> memo = Memo(max_items=2)
    >>> memo.get("a", lambda: 1), memo.get("a", lambda: 2)
    (1, 1)
    """

    def __init__(self, max_items: int) -> None:
        if max_items < 1:
            msg = f"A Memo needs max_items >= 1; found {max_items}."
            raise ValueError(msg)
        self.max_items = max_items
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._running: dict[Hashable, Future[Any]] = {}

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """Return the value remembered for ``key``, else ``compute()`` (remembered from then on)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self._keep(key, value)
        return value

    def get_once(self, key: Hashable, compute: Callable[[], T]) -> T:
        """As :meth:`get`, but a thread asking for a key being computed waits for that computation.

        For a computation too costly to run twice at once (minutes, gigabytes): every
        session opening a large file with a stored velocity but no velocity graph started
        its own (``ExplorerState._derive_stored``). A failure reaches every waiting thread
        and is not remembered, so a later call tries again.
        """
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            running = self._running.get(key)
            if running is None:
                future: Future[Any] = Future()
                self._running[key] = future
        if running is not None:
            return running.result()
        try:
            value = compute()
        except BaseException as err:
            with self._lock:
                self._running.pop(key, None)
            future.set_exception(err)
            raise
        with self._lock:
            self._keep(key, value)
            self._running.pop(key, None)
        future.set_result(value)
        return value

    def _keep(self, key: Hashable, value: Any) -> None:
        """Remember ``value`` as the most recent, dropping the least recent beyond the bound (lock held)."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


#: how many results one dataset's shared memo keeps (a few bases, colour maps and the stored fit)
SHARED_ITEMS = 32

_SHARED: dict[int, Memo] = {}
_SHARED_LOCK = threading.Lock()


def shared_memo(owner: object) -> Memo:
    """Return the memo shared by every session that shows ``owner`` (the same object), dropped with it.

    The server loads a dataset once and every session shows that object read-only, so
    what each would compute alike lives here once: the stored fit (whose streamlines are
    then computed once), embedding coordinates, gene means, colour maps.
    """
    key = id(owner)
    with _SHARED_LOCK:
        memo = _SHARED.get(key)
        if memo is None:
            memo = _SHARED[key] = Memo(SHARED_ITEMS)
            weakref.finalize(owner, _SHARED.pop, key, None)
    return memo
