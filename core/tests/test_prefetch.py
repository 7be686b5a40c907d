"""core.prefetch.ahead: the same items in the same order, each yielded only after the next
`depth` were asked for (flax_impl's device prefetch)."""

import pytest

from core.prefetch import ahead


@pytest.mark.parametrize("depth", [0, 1, 2, 7])
def test_ahead_keeps_the_items_and_asks_for_depth_more_first(depth):
    asked = []

    def items():
        for i in range(5):
            asked.append(i)
            yield i

    got = []
    for item in ahead(items(), depth):
        # when item k is handed over, items up to k + depth (those that exist) were placed
        assert asked[-1] == min(item + depth, 4)
        got.append(item)
    assert got == list(range(5))
