"""A generator run in a thread a few items ahead, so that host work (decoding, TrivialAugment)
overlaps the device's step: used by both stacks' input pipelines. Its items, and the order they
come in, are the generator's own; an exception inside it is raised in the consumer."""

from __future__ import annotations

import collections
import queue
import threading


class Prefetch:
    """Run a generator in a thread, `depth` items ahead (host work overlaps device work)."""

    def __init__(self, gen, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._fill, args=(gen,), daemon=True)
        self.thread.start()

    def _fill(self, gen):
        try:
            for item in gen:
                self.q.put(("item", item))
        except BaseException as err:  # re-raised in the consumer
            self.q.put(("error", err))
            return
        self.q.put(("end", None))

    def __iter__(self):
        while True:
            kind, item = self.q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item


def ahead(items, depth: int):
    """The items of `items`, each yielded once the next `depth` have been asked for: flax_impl
    places batches on the devices this way, so batch k+1's copy (asynchronous in JAX) is under way
    before step k is dispatched, and a step never waits for its own input. The order and the
    items are unchanged; depth 0 yields each as it comes."""
    window: collections.deque = collections.deque()
    for item in items:
        window.append(item)
        if len(window) > depth:
            yield window.popleft()
    while window:
        yield window.popleft()
