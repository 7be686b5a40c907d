"""How a batch (or a data set) is split among processes and replicas: a leaf module, used by
the data plan (core.sampling) and the regularisers (each row's MixUp/CutMix partner comes from
its own replica's share)."""


def share(count: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, stop) of process `rank`'s share of `count` items, split as evenly as possible."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def group_bounds(batch: int, groups: int) -> list[tuple[int, int]]:
    """The replicas' shares of a global batch of `batch` rows, split as `share` does."""
    return [share(batch, groups, g) for g in range(groups)]
