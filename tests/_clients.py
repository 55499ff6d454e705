"""Clients that keep a server busy while tests publish: threads sending requests until stopped,
every answer (or failure) kept, with waits on what they saw (never sleeps)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence


class Clients:
    """`count` threads calling `ask(payload)` (thread i sends payloads[i % len(payloads)]) until
    the block ends; `answers` holds (payload, answer) pairs, `failures` every exception."""

    def __init__(self, ask: Callable[[object], dict], payloads: Sequence[object], count: int,
                 wait_s: float = 120.0) -> None:
        self.ask, self.wait_s = ask, wait_s
        self.answers: list[tuple[object, dict]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.seen = threading.Condition()
        self.threads = [threading.Thread(target=self._run, args=(payloads[i % len(payloads)],)) for i in range(count)]

    def _run(self, payload: object) -> None:
        while not self.stop.is_set():
            try:
                answer = self.ask(payload)
            except Exception as exc:  # noqa: BLE001 - every failure is counted; none may happen
                self.failures.append(repr(exc))
                continue
            with self.seen:
                self.answers.append((payload, answer))
                self.seen.notify_all()

    def wait_for_version(self, version: object, timeout: float) -> bool:
        """Until a recent answer names `version`."""
        with self.seen:
            return self.seen.wait_for(lambda: any(a["version"] == version for _, a in self.answers[-64:]), timeout)

    def wait_for_more_answers(self, count: int, timeout: float) -> list[dict]:
        """The next `count` answers (fewer on timeout)."""
        with self.seen:
            start = len(self.answers)
            self.seen.wait_for(lambda: len(self.answers) >= start + count, timeout)
            return [answer for _, answer in self.answers[start:]]

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(self.wait_s)
