"""Reads through ``first_read_path`` take Ray Data's first read path; the caller's settings stay."""

import pytest
import ray.data

from raylens.ray_data_reads import first_read_path


@pytest.fixture
def context() -> ray.data.DataContext:
    context = ray.data.DataContext.get_current()
    chosen = context.use_datasource_v2, context.enable_progress_bars
    yield context
    context.use_datasource_v2, context.enable_progress_bars = chosen


@pytest.mark.parametrize("progress_bars", [True, False])
def test_the_first_path_inside_and_the_callers_settings_after(
    context: ray.data.DataContext, progress_bars: bool
) -> None:
    context.use_datasource_v2, context.enable_progress_bars = True, True
    with first_read_path(progress_bars=progress_bars):
        assert context.use_datasource_v2 is False
        assert context.enable_progress_bars is progress_bars
    assert (context.use_datasource_v2, context.enable_progress_bars) == (True, True)


def test_bars_a_caller_turned_off_stay_off_and_an_error_restores_too(context: ray.data.DataContext) -> None:
    context.use_datasource_v2, context.enable_progress_bars = True, False
    with pytest.raises(RuntimeError), first_read_path(progress_bars=True):
        assert context.enable_progress_bars is False
        raise RuntimeError("a read that fails")
    assert (context.use_datasource_v2, context.enable_progress_bars) == (True, False)
