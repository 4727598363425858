"""``engine.pipeline.collector``: the run's collector settings, and their undoing."""

from __future__ import annotations

import gc

from engine.pipeline import collector


def test_within_a_run_start_up_objects_are_frozen_and_young_collections_rarer() -> None:
    before = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    with collector.tuned(young=12_345):
        assert gc.get_threshold() == (12_345, *before[1:])
        assert gc.get_freeze_count() > frozen_before
        assert gc.isenabled()  # cycles are still collected
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_the_settings_are_undone_when_the_run_fails() -> None:
    before = gc.get_threshold()
    try:
        with collector.tuned():
            raise RuntimeError("the run failed")
    except RuntimeError:
        pass
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
