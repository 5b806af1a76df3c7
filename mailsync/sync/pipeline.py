"""Run an iterator one step ahead of its consumer, in a thread (no Django here)."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def run_ahead(items: Iterable[T], *, name: str) -> Iterator[T]:
    """Yield the items of ``items``, producing the next ones in a worker thread while the
    consumer works on the current one (at most two produced and not yet consumed).

    An error in the producer is raised here, after the items before it were yielded. When
    the consumer stops early, the producer stops at its next item.
    """
    slots: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

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
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item[0]
    finally:
        stop.set()
        worker.join()
