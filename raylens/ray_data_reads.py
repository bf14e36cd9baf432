"""How raylens asks Ray Data to read files.

Ray 2.60 has two read paths. The second (``DataContext.use_datasource_v2``, its default) lists
the files again in a task of its own every time a dataset is executed, which costs ~2 s before
the first batch whatever the data's size (0.07 s with the first path): an epoch of a streamed
split, a prediction over a file. ``first_read_path`` chooses the first path for the reads made
inside it and leaves the process's ``DataContext`` as it was after, so raylens used as a
library changes nothing of its caller's Ray Data settings. Lives outside the four packages,
like ``raylens.errors``: the trainer and the cluster's prediction both read through it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def first_read_path(*, progress_bars: bool = True) -> Iterator[None]:
    """Datasets read in this block take Ray Data's first read path; with ``progress_bars=False``
    they show no progress bars either. A dataset keeps the settings it was made with (Ray Data
    copies the context into it, and the datasets made from it share that copy), so the block
    needs to hold the read alone, not the dataset's executions."""
    import ray.data

    context = ray.data.DataContext.get_current()
    chosen = context.use_datasource_v2, context.enable_progress_bars
    context.use_datasource_v2 = False
    context.enable_progress_bars = chosen[1] and progress_bars
    try:
        yield
    finally:
        context.use_datasource_v2, context.enable_progress_bars = chosen
