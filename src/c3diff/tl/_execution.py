"""Running tile tasks on whatever dask scheduler is active, with a progress bar, never starting a cluster."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any


def active_client():
    """The current ``dask.distributed`` client, or ``None`` (never starts one)."""
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover
        return None
    try:
        return default_client()
    except ValueError:
        return None


def run_tasks(
    func: Callable[..., Any],
    items: list[Any],
    *,
    extra_args: tuple = (),
    wave: int = 4,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(i, func(items[i], *extra_args))`` as tasks finish, on the active dask scheduler.

    With a ``distributed`` client, tasks are submitted as futures and yielded as they complete (so results are
    pulled and released one by one); otherwise ``wave`` tasks at a time go through ``dask.compute`` on the configured
    local scheduler (threads by default). At most ``wave`` (local) results are held at once.
    """
    import dask

    client = active_client()
    if client is not None:
        from distributed import as_completed

        futures = {client.submit(func, item, *extra_args, pure=False): i for i, item in enumerate(items)}
        for future in as_completed(futures):
            yield futures[future], future.result()
            future.release()
        return
    for start in range(0, len(items), wave):
        chunk = items[start : start + wave]
        results = dask.compute(*[dask.delayed(func, pure=False)(item, *extra_args) for item in chunk])
        yield from zip(range(start, start + len(chunk)), results, strict=True)


def chunked(items: Iterable[Any], size: int) -> list[list[Any]]:
    items = list(items)
    return [items[i : i + size] for i in range(0, len(items), size)]
