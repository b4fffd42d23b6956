"""Sign-in attempts, limited in memory: after too many failures from one address or for one pseudonym, every
attempt is refused until the oldest failure leaves the window (a right password too: guessing must not pay)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

MAX_FAILURES = 5
WINDOW_S = 300.0
MAX_KEYS = 10_000  # past this many tracked keys, forget those with no recent failure


class RateLimiter:
    """At most `max_failures` failed attempts per key (client address, pseudonym) in `window_s` seconds.

    `clock` returns seconds (monotonic by default; tests pass a fake one). Safe to share between threads.
    """

    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, keys: Iterable[str]) -> float | None:
        """Seconds until an attempt under `keys` is allowed again, or None when it is allowed now."""
        now = self.clock()
        waits = []
        with self._lock:
            for key in keys:
                recent = self._recent(key, now)
                if len(recent) >= self.max_failures:
                    waits.append(recent[-self.max_failures] + self.window_s - now)
        return max(waits) if waits else None

    def failed(self, keys: Iterable[str]) -> None:
        """Count one failed attempt under each of `keys`."""
        now = self.clock()
        with self._lock:
            if len(self._failures) > MAX_KEYS:
                for key in list(self._failures):
                    self._recent(key, now)
            for key in keys:
                self._failures.setdefault(key, deque()).append(now)

    def forget(self, key: str) -> None:
        """Clear a key's failures (a pseudonym that signed in; never an address, which anyone can share)."""
        with self._lock:
            self._failures.pop(key, None)

    def _recent(self, key: str, now: float) -> deque[float]:
        recent = self._failures.get(key, deque())
        while recent and recent[0] <= now - self.window_s:
            recent.popleft()
        if not recent:
            self._failures.pop(key, None)
        return recent
