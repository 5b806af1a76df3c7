"""Batches, and an iterator run ahead of its consumer in a thread (no Django here)."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()
# The first batch of a download is this small, so that storing starts while the rest is
# still being fetched (the pipeline fills sooner).
FIRST_BATCH = 50


def batched(items: Iterable[T], size_of: Callable[[T], int], *, max_items: int,
            max_bytes: int) -> Iterator[list[T]]:
    """Consecutive batches of at most ``max_items`` items and about ``max_bytes`` (a single
    larger item makes a batch of its own); the first at most FIRST_BATCH items."""
    batch: list[T] = []
    total = 0
    limit = min(max_items, FIRST_BATCH)
    for item in items:
        size = size_of(item)
        if batch and (len(batch) >= limit or total + size > max_bytes):
            yield batch
            batch, total, limit = [], 0, max_items
        batch.append(item)
        total += size
    if batch:
        yield batch


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
