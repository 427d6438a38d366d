"""Top-down forecast of the system series: hand-computable cases, no look-ahead, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.topdown import empirical_quantiles, topdown_forecast


def test_a_constant_series_is_forecast_exactly():
    x = np.full((40, 2), 7.0)
    upper, mean = topdown_forecast(x, 0.95)
    assert upper.shape == mean.shape == (6, 2)
    np.testing.assert_allclose(upper, 7.0)
    np.testing.assert_allclose(mean, 7.0)


def test_the_upper_bound_is_the_best_scoring_point_plus_its_past_error_quantile():
    # alternating 10, 20, ending on 20. The last value errs by -10 or +10 (half each) one bucket
    # ahead and by 0 two buckets ahead; the peak of the last two buckets (20) by -10 or 0 one bucket
    # ahead: it scores better there (pinball at 0.9: 0.5 vs 1), the last value two buckets ahead (0 vs 0.5)
    x = np.tile([[10.0], [20.0]], (30, 1))
    upper, mean = topdown_forecast(x, 0.9, error_scale="none")
    np.testing.assert_allclose(upper[:, 0], 20.0)
    np.testing.assert_allclose(mean[1::2, 0], 20.0)
    # one bucket ahead: 20 + the mean of {-10, 0}; the first origin's peak saw only one bucket (10: +10)
    np.testing.assert_allclose(mean[0::2, 0], 20.0 + (-10.0 * 27 + 10.0) / 54)
    # the last value alone: 20 + the 0.9 quantile of {-10, +10} one bucket ahead; mean error 0
    up_last, mean_last = topdown_forecast(x, 0.9, widths=(1,), error_scale="none")
    np.testing.assert_allclose(up_last[:, 0], [30.0, 20.0, 30.0, 20.0, 30.0, 20.0])
    np.testing.assert_allclose(mean_last[:, 0], 20.0)


def test_a_forecast_reads_only_the_history_it_is_given_and_matches_the_replay_form():
    rng = np.random.default_rng(3)
    x = rng.gamma(2.0, 5.0, size=(120, 3))
    upper, mean = topdown_forecast(x[:100], 0.9)
    # the replay form at every step: row 100 of the series (whatever follows) is the same forecast
    for tail in (x[100:], np.zeros((20, 3)), np.full((20, 3), 1e6)):
        series = np.concatenate([x[:100], tail])
        up_all, mean_all = empirical_quantiles(series, 0.9, window=94, refit=1, error_scale="sqrt",
                                               point_widths=(1, 2, 3, 4, 5, 6))
        np.testing.assert_allclose(up_all[100], upper, rtol=1e-12)
        np.testing.assert_allclose(mean_all[100], mean, rtol=1e-12)


def test_too_little_history_gives_no_forecast_and_bad_input_is_refused():
    assert topdown_forecast(np.ones((17, 2)), 0.9) is None  # 11 past errors < 12
    assert topdown_forecast(np.ones((18, 2)), 0.9) is not None
    with pytest.raises(ValueError, match="finite"):
        topdown_forecast(np.array([[1.0], [np.nan]] * 20), 0.9)
    with pytest.raises(ValueError, match=">= 0"):
        topdown_forecast(-np.ones((30, 1)), 0.9)
    with pytest.raises(ValueError, match="level"):
        topdown_forecast(np.ones((30, 1)), 0.0)
    with pytest.raises(ValueError, match="buckets, resources"):
        topdown_forecast(np.ones(30), 0.9)
    with pytest.raises(ValueError, match="error_scale"):
        empirical_quantiles(np.ones((30, 1)), 0.9, window=10, refit=1, error_scale="log")


def test_the_reconciled_choice_scores_only_the_past_and_keeps_the_safe_candidate_until_it_has_enough():
    from pipeline.topdown import reconcile_choice

    rng = np.random.default_rng(3)
    n, hz = 80, 6
    actual = rng.gamma(3.0, 10.0, (n, hz, 2))
    good = actual + 1.0  # just above every actual: the best 0.9-quantile bound by far
    uppers = np.stack([actual + 30.0, actual - 20.0, good])
    pick = reconcile_choice(uppers, actual, 0.9, window=20, min_scored=5)
    for j in range(hz):  # issue n has scored n - j issues of horizon j (capped at 20): candidate 0 until 5
        assert (pick[: 5 + j, j] == 0).all() and (pick[5 + j:, j] == 2).all()
    # nothing issued at or after n, and no demand at or after bucket n, moves row n
    i = 40
    later = uppers.copy()
    later[:, i:] = rng.gamma(3.0, 10.0, later[:, i:].shape)
    moved = actual.copy()
    for j in range(hz):
        moved[i - j:, j] = 0.0  # the demand of buckets >= i
    np.testing.assert_array_equal(reconcile_choice(later, moved, 0.9, window=20, min_scored=5)[i], pick[i])
    # an issue where a candidate had no bound is not scored; equal losses keep the first candidate
    holes = uppers.copy()
    holes[2, :30] = np.nan
    assert (reconcile_choice(holes, actual, 0.9, window=20, min_scored=5)[: 30 + 5, 0] == 0).all()
    same = np.stack([good, good, actual - 5.0])
    assert (reconcile_choice(same, actual, 0.9, window=20, min_scored=5) == 0).all()
    # the choice follows the recent past: once the sum falls 40 short from issue 40 on, the higher of
    # the two (30 over: loss 3 per issue, against 36 for the sum) takes over as soon as the window's
    # mean says so (issue 41 of horizon 5 min: one short issue among ten)
    switch = uppers.copy()
    switch[2, 40:] = actual[40:] - 40.0
    late = reconcile_choice(switch, actual, 0.9, window=10, min_scored=5)
    assert (late[5:41, 0] == 2).all() and (late[41:, 0] == 0).all()
    with pytest.raises(ValueError, match="level"):
        reconcile_choice(uppers, actual, 0.0, window=20, min_scored=5)
    with pytest.raises(ValueError, match="candidates, issues"):
        reconcile_choice(uppers, actual[:, :3], 0.9, window=20, min_scored=5)
    with pytest.raises(ValueError, match="min_scored"):
        reconcile_choice(uppers, actual, 0.9, window=0, min_scored=5)


def test_candidates_equal_over_the_window_tie_whatever_the_running_sums_rounding():
    from pipeline.topdown import reconcile_choice

    rng = np.random.default_rng(5)
    n, hz = 400, 6
    actual = rng.gamma(3.0, 300.0, (n, hz, 2))
    first = actual + 1.37 * rng.gamma(2.0, 30.0, (n, hz, 2))
    second = first.copy()
    second[:200] = actual[:200] + 0.71 * rng.gamma(2.0, 3.0, (200, hz, 2))  # better before issue 200, then the same
    uppers = np.stack([first, second, actual - 500.0])
    # from issue 230 on every window of 24 holds only issues where the two are equal: a tie, the first wins
    # (plain argmin of the differenced running sums picked the second in most of these cells)
    assert (reconcile_choice(uppers, actual, 0.9, window=24, min_scored=5)[230:] == 0).all()
