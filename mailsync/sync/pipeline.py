"""Run an iterator one step ahead of its consumer, in a thread (no Django here)."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def run_ahead(items: Iterable[T], *, name: str, depth: int = 1) -> Iterator[T]:
    """Yield the items of ``items``, producing the next ones in a worker thread while the
    consumer works on the current one: at most ``depth`` + 1 produced and not yet consumed
    (``depth=0``: double buffering, the next item waits until the consumer takes the last).

    An error in the producer is raised here, after the items before it were yielded. When
    the consumer stops early, the producer stops at its next item.
    """
    slots: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    taken = threading.Semaphore(0)

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.5)
                break
            except queue.Full:
                continue
        else:
            return False
        if depth == 0:  # wait until the consumer has it before producing the next
            while not stop.is_set():
                if taken.acquire(timeout=0.5):
                    return True
            return False
        return True

    def produce() -> None:
        try:
            for item in items:
                if not offer((item,)):
                    return
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer)
            offer(exc)
            return
        offer(_END)

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            taken.release()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item[0]
    finally:
        stop.set()
        worker.join()
