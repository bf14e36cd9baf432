"""How ``bench asha`` counts what BENCHMARKS.md reports: epochs and trials to a target, a seed
where random search misses it left out, one where ASHA alone misses it counted against ASHA, and
the check that ASHA's curves begin random search's over the trials both ran."""

from bench.asha import compared, curves_are_prefixes, to_target


def test_a_sweep_spends_every_report_until_the_first_that_reaches_the_target() -> None:
    reports = [("t_00000", 0.5), ("t_00000", 0.9), ("t_00001", 0.7), ("t_00001", 0.97), ("t_00002", 0.99)]
    assert to_target(reports, 0.97) == (4, 2)
    assert to_target(reports, 0.995) is None


def test_seeds_are_compared_only_where_random_search_reaches_the_target() -> None:
    reached = [("t_00000", 0.5), ("t_00001", 0.98)]  # random search: 2 epochs, 2 trials
    missed = [("t_00000", 0.5), ("t_00001", 0.6)]
    asha_quick = [("t_00001", 0.98)]
    sweeps = [
        [reached, asha_quick, reached],  # ASHA 1 epoch of random search's 2: share 0.5
        [reached, missed, missed],  # ASHA stopped the trial that would have: infinite
        [missed, missed, reached],  # random search never reached it: left out, TPE 2 ÷ (2 + 1)
    ]
    figures = compared(sweeps, 0.98, trials=2)
    assert figures["seeds_compared"] == 2 and figures["asha_epoch_shares"] == [0.5, None]
    assert figures["asha_epoch_share"] is None  # the median of 0.5 and ∞ is ∞: not met
    assert figures["tpe_trial_share"] == 1.0  # median of 1, 3 ÷ 2, 2 ÷ 3
    assert compared(sweeps[:1], 0.98, trials=2)["asha_epoch_share"] == 0.5


def test_asha_curves_must_begin_random_search_curves_over_the_trials_both_ran() -> None:
    random_search = [("a_00000", 0.5), ("a_00000", 0.6), ("a_00001", 0.98)]  # ended at the goal
    assert curves_are_prefixes([("b_00000", 0.5), ("b_00001", 0.98), ("b_00002", 0.7)], random_search)
    assert not curves_are_prefixes([("b_00000", 0.5), ("b_00000", 0.61)], random_search)
