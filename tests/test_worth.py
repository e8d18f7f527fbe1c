"""Tests for evaluation.worth (worth-N of a score against a ladder of random coresets).

Every expected number is worked out by hand in the comments: on a segment from
(N_a, m_a) to (N_b, m_b) the worth of a score m is
    N = N_a * (N_b / N_a) ** ((m - m_a) / (m_b - m_a)),
i.e. for a ladder by powers of ten, N = 10 ** (log10 N_a + (m - m_a) / (m_b - m_a)).
"""
from __future__ import annotations

import json

import pytest
from PIL import Image

from evaluation.worth import DPI, FIGSIZE, WorthN, format_worth, plot_worth, worth_n

REL = 1e-6


def summary(mean: float, std: float) -> dict:
    return {"mean": mean, "std": std, "runs": [mean]}


# {100: 5 ± 0.5, 1000: 10 ± 1}
TWO = {100: summary(5.0, 0.5), 1000: summary(10.0, 1.0)}
# {100: 10 ± 3, 1000: 20 ± 4, 10000: 30 ± 2}
THREE = {100: summary(10.0, 3.0), 1000: summary(20.0, 4.0), 10000: summary(30.0, 2.0)}


# --------------------------------------------------------------------------- #
# Point estimate
# --------------------------------------------------------------------------- #
def test_midpoint_of_two_point_ladder():
    # 7.5 is half way from 5 to 10, so log10 N = 2 + 0.5 = 2.5 and N = 10**2.5 = 316.227766...
    w = worth_n(TWO, 7.5)
    assert w.n == pytest.approx(316.22776601683796, rel=REL)
    assert w.bound is None
    assert (w.n_min, w.n_max) == (100, 1000)


def test_ladder_points_are_hit_exactly():
    # A score equal to a ladder mean is worth exactly that ladder size.
    assert worth_n(THREE, 10.0).n == pytest.approx(100.0, rel=REL)
    assert worth_n(THREE, 20.0).n == pytest.approx(1000.0, rel=REL)
    assert worth_n(THREE, 30.0).n == pytest.approx(10000.0, rel=REL)
    assert worth_n(THREE, 30.0).bound is None


def test_second_segment_and_key_order():
    # 25 is half way from 20 (N=1000) to 30 (N=10000): N = 10**3.5 = 3162.27766...
    shuffled = {10000: THREE[10000], 100: THREE[100], 1000: THREE[1000]}
    assert worth_n(shuffled, 25.0).n == pytest.approx(3162.2776601683795, rel=REL)


def test_string_keys_from_json_are_accepted():
    ladder = json.loads(json.dumps(TWO))  # keys become "100", "1000"
    assert worth_n(ladder, 7.5).n == pytest.approx(316.22776601683796, rel=REL)


def test_non_monotone_ladder_uses_running_max():
    # Raw means 10, 14, 12, 20 at N = 100, 200, 500, 1000 -> running max 10, 14, 14, 20.
    ladder = {100: summary(10, 0), 200: summary(14, 0), 500: summary(12, 0), 1000: summary(20, 0)}
    # 13 lies 3/4 of the way from 10 to 14: N = 100 * 2**0.75 = 168.179283...
    # (Raw means would also cross 13 on 200-500 and 500-1000: three answers.)
    assert worth_n(ladder, 13.0).n == pytest.approx(168.1792830507429, rel=REL)
    # 14 is reached first at N=200 (flat 200-500 stretch: the left point is taken).
    assert worth_n(ladder, 14.0).n == pytest.approx(200.0, rel=REL)
    # 17 is half way from 14 (N=500) to 20 (N=1000): N = 500 * sqrt(2) = 707.106781...
    # (the dip to 12 at N=500 is ignored: interpolation starts from the running max 14).
    assert worth_n(ladder, 17.0).n == pytest.approx(707.1067811865476, rel=REL)


def test_flat_start_takes_left_point():
    # Means 10, 10, 20: the score 10 is first reached at N=100.
    ladder = {100: summary(10, 0), 200: summary(10, 0), 1000: summary(20, 0)}
    assert worth_n(ladder, 10.0).n == pytest.approx(100.0, rel=REL)


# --------------------------------------------------------------------------- #
# Out of range
# --------------------------------------------------------------------------- #
def test_below_and_above_range_are_bounds():
    below = worth_n(TWO, 4.0)
    assert (below.n, below.bound) == (None, "below")
    above = worth_n(TWO, 10.5)
    assert (above.n, above.bound) == (None, "above")
    # With std 0 the ladder std at the end point still widens the range:
    # below: sigma = 0.5 (std at N=100), 4 ± 0.5 -> 3.5 and 4.5, both under 5.
    assert (below.low, below.low_bound, below.high, below.high_bound) == (None, "below", None, "below")
    # above: sigma = 1 (std at N=1000), 10.5 - 1 = 9.5 is in range:
    # N = 10**(2 + 4.5/5) = 10**2.9 = 794.328234...; 11.5 is above.
    assert above.low == pytest.approx(794.3282347242815, rel=REL)
    assert above.low_bound is None
    assert (above.high, above.high_bound) == (None, "above")


def test_below_range_with_high_side_in_range():
    # 8 < 10: below. sigma = sqrt(1**2 + 3**2) = sqrt(10) = 3.16227766 (std at the first point, 3).
    # high = 8 + 3.16227766 = 11.16227766: N = 10**(2 + 1.16227766/10) = 130.685609...
    w = worth_n(THREE, 8.0, 1.0)
    assert (w.n, w.bound) == (None, "below")
    assert (w.low, w.low_bound) == (None, "below")
    assert w.high == pytest.approx(130.68560899451788, rel=REL)
    assert w.high_bound is None


def test_above_range_with_low_side_in_range():
    # 31 > 30: above. sigma = sqrt(1.5**2 + 2**2) = sqrt(6.25) = 2.5 (std at the last point, 2).
    # low = 28.5: N = 10**(3 + 8.5/10) = 10**3.85 = 7079.457843...
    w = worth_n(THREE, 31.0, 1.5)
    assert (w.n, w.bound) == (None, "above")
    assert w.low == pytest.approx(7079.457843841381, rel=REL)
    assert w.low_bound is None
    assert (w.high, w.high_bound) == (None, "above")


# --------------------------------------------------------------------------- #
# Uncertainty
# --------------------------------------------------------------------------- #
def test_sigma_at_a_ladder_point():
    # mean 20 -> N = 1000 exactly, where the ladder std is 4.
    # sigma = sqrt(3**2 + 4**2) = 5; low = worth(15) = 10**2.5 = 316.227766, high = worth(25) = 10**3.5.
    w = worth_n(THREE, 20.0, 3.0)
    assert w.n == pytest.approx(1000.0, rel=REL)
    assert w.low == pytest.approx(316.22776601683796, rel=REL)
    assert w.high == pytest.approx(3162.2776601683795, rel=REL)
    assert (w.low_bound, w.high_bound) == (None, None)


def test_sigma_uses_ladder_std_interpolated_in_log_n():
    # mean 15 -> N = 10**2.5, half way (in log N) from 100 (std 3) to 1000 (std 4): s_ladder = 3.5.
    # std 0 -> sigma = 3.5. low = worth(11.5) = 10**(2 + 1.5/10) = 10**2.15 = 141.253754...
    # high = worth(18.5) = 10**(2 + 8.5/10) = 10**2.85 = 707.945784...
    w = worth_n(THREE, 15.0)
    assert w.n == pytest.approx(316.22776601683796, rel=REL)
    assert w.low == pytest.approx(141.2537544622754, rel=REL)
    assert w.high == pytest.approx(707.945784384138, rel=REL)


def test_sigma_combines_both_stds():
    # Two-point ladder, mean 7.5 -> N = 10**2.5, s_ladder = (0.5 + 1) / 2 = 0.75.
    # std 0.3 -> sigma = sqrt(0.09 + 0.5625) = sqrt(0.6525) = 0.807774721...
    # low  = 10**(2 + (2.5 - 0.807774721) / 5) = 10**2.338445... = 217.994258...
    # high = 10**(2 + (2.5 + 0.807774721) / 5) = 10**2.661554... = 458.727677...
    w = worth_n(TWO, 7.5, 0.3)
    assert w.low == pytest.approx(217.99425870755135, rel=REL)
    assert w.high == pytest.approx(458.72767747592053, rel=REL)


def test_low_side_below_range():
    # mean 12 -> N = 10**2.2 = 158.489319; s_ladder = 3 + 0.2 * (4 - 3) = 3.2.
    # std 4 -> sigma = sqrt(16 + 10.24) = sqrt(26.24) = 5.122499...
    # low = 6.877... < 10: below; high = 17.122499: N = 10**(2 + 0.7122499) = 515.525247...
    w = worth_n(THREE, 12.0, 4.0)
    assert w.n == pytest.approx(158.48931924611142, rel=REL)
    assert (w.low, w.low_bound) == (None, "below")
    assert w.high == pytest.approx(515.525246996701, rel=REL)
    assert w.high_bound is None


def test_zero_uncertainty_collapses_range():
    ladder = {100: summary(5, 0), 1000: summary(10, 0)}
    w = worth_n(ladder, 7.5)
    assert w.low == pytest.approx(w.n, rel=REL) and w.high == pytest.approx(w.n, rel=REL)


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("ladder, message", [
    ({}, "at least 2"),
    ({100: summary(5, 1)}, "at least 2"),
    ({0: summary(1, 0), 100: summary(5, 1)}, "at least 1"),
    ({-10: summary(1, 0), 100: summary(5, 1)}, "at least 1"),
    ({2.5: summary(1, 0), 100: summary(5, 1)}, "whole number"),
    ({100: {"mean": 5}, 1000: summary(10, 1)}, "'mean' and 'std'"),
    ({100: summary(float("nan"), 0), 1000: summary(10, 1)}, "finite"),
    ({100: summary(5, -1), 1000: summary(10, 1)}, ">= 0"),
    ({100: summary(5, 0), "100": summary(6, 0)}, "twice"),
])
def test_bad_ladders_raise(ladder, message):
    with pytest.raises(ValueError, match=message):
        worth_n(ladder, 5.0)


def test_bad_score_raises():
    with pytest.raises(ValueError, match="finite"):
        worth_n(TWO, float("nan"))
    with pytest.raises(ValueError, match=">= 0"):
        worth_n(TWO, 7.0, -0.1)


# --------------------------------------------------------------------------- #
# Text and JSON
# --------------------------------------------------------------------------- #
def _w(n, low, high, bound=None, low_bound=None, high_bound=None, n_min=100, n_max=30000):
    return WorthN(n=n, bound=bound, low=low, high=high, low_bound=low_bound, high_bound=high_bound,
                  n_min=n_min, n_max=n_max)


def test_format_in_range():
    # 1237.4 -> 3 significant figures -> 1,240; 821.3 -> 821; 1904.9 -> 1,900.
    assert format_worth(_w(1237.4, 821.3, 1904.9)) == "1,240 (821–1,900)"
    # 12,345 -> 12,300; 999.6 -> 1,000; 56,780 -> 56,800.
    assert format_worth(_w(12345.0, 999.6, 56780.0)) == "12,300 (1,000–56,800)"
    # Small counts are rounded to whole pairs: 31.6 -> 32.
    assert format_worth(_w(31.6, 12.2, 99.4, n_min=10)) == "32 (12–99)"


def test_format_bounds():
    assert format_worth(_w(None, None, None, bound="below", low_bound="below", high_bound="below")) == "< 100"
    assert format_worth(_w(None, None, None, bound="above", low_bound="above", high_bound="above")) == "> 30,000"
    assert format_worth(_w(640.2, None, 1104.0, low_bound="below")) == "640 (< 100–1,100)"
    assert format_worth(_w(640.2, 420.0, None, high_bound="above")) == "640 (420–> 30,000)"


def test_format_end_to_end():
    assert format_worth(worth_n(THREE, 15.0)) == "316 (141–708)"  # 316.23 (141.25–707.95)
    assert format_worth(worth_n(THREE, 12.0, 4.0)) == "158 (< 100–516)"  # 158.49 (< 100–515.53)
    assert format_worth(worth_n(THREE, 8.0, 1.0)) == "< 100"
    assert format_worth(worth_n(THREE, 31.0, 1.5)) == "> 10,000"
    # No spread at all: a single number.
    assert format_worth(worth_n({100: summary(5, 0), 1000: summary(10, 0)}, 7.5)) == "316"


def test_as_dict_is_json_friendly():
    d = worth_n(THREE, 12.0, 4.0).as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["n"] == pytest.approx(158.48931924611142, rel=REL)
    assert (d["bound"], d["low"], d["low_bound"], d["high_bound"]) == (None, None, "below", None)
    assert d["high"] == pytest.approx(515.525246996701, rel=REL)
    assert (d["n_min"], d["n_max"]) == (100, 10000)
    assert d["text"] == "158 (< 100–516)"


def test_worth_is_frozen():
    w = worth_n(TWO, 7.5)
    with pytest.raises(AttributeError):
        w.n = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- #
# Figure
# --------------------------------------------------------------------------- #
def test_plot_worth_writes_png(tmp_path):
    ladder = {100: summary(10, 1), 200: summary(14, 1.5), 500: summary(12, 1), 1000: summary(20, 2)}
    points = {"distilled": {"mean": 15.0, "std": 0.8}, "tiny": {"mean": 5.0, "std": 0.0},
              "huge": {"mean": 25.0, "std": 1.0}}
    out = plot_worth(ladder, points, tmp_path / "new" / "folder" / "worth.png", title="test",
                     full=summary(30.0, 0.5))
    assert out == tmp_path / "new" / "folder" / "worth.png"
    assert out.stat().st_size > 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    assert (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI)) == (700, 450)


def test_plot_worth_closes_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plot_worth(TWO, {}, str(tmp_path / "empty.png"))
    assert len(plt.get_fignums()) == before
    assert (tmp_path / "empty.png").stat().st_size > 0
