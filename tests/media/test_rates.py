"""The one frame-rate rule (media/rates.py): what its doc says, exactly."""

from __future__ import annotations

from fractions import Fraction

import pytest

from musetalk_service.media.rates import exact_rate, output_rate, parse_fps


def test_floats_snap_to_the_simplest_nearby_fraction_up_to_denominator_1001():
    assert exact_rate(29.97) == Fraction(2997, 100)  # exact as given: not 30000/1001
    assert exact_rate(30000 / 1001) == Fraction(30000, 1001)
    assert exact_rate(24000 / 1001) == Fraction(24000, 1001)
    assert exact_rate(12.5) == Fraction(25, 2)


def test_strings_ints_and_fractions_are_taken_exactly():
    assert exact_rate("30000/1001") == Fraction(30000, 1001)
    assert exact_rate(25) == 25
    assert exact_rate(Fraction(1, 3000)) == Fraction(1, 3000)  # a Fraction is never snapped
    with pytest.raises(ValueError, match="positive"):
        exact_rate(-1.0)


def test_output_rate_is_the_requested_one_else_the_videos():
    assert output_rate(None, Fraction(30000, 1001)) == Fraction(30000, 1001)
    assert output_rate(29.97, Fraction(25)) == Fraction(2997, 100)


@pytest.mark.parametrize("value, rate", [(25, Fraction(25)), (29.97, Fraction(2997, 100)), ("30000/1001", Fraction(30000, 1001)), ("25/1", Fraction(25)), (" 24 ", Fraction(24))])
def test_parse_fps_accepts_numbers_and_exact_rate_strings(value, rate):
    assert parse_fps(value) == rate


@pytest.mark.parametrize("value", [0.0001, 5e-324, 1e308, float("nan"), float("inf"), 0, 0.5, 121, "1/0", "abc", "-25", "1e3", True, None, [25]])
def test_parse_fps_refuses_what_is_no_output_rate(value):
    # 0.0001 and 5e-324 would snap to 0 and fail deep in the pipeline; they are refused up front.
    with pytest.raises(ValueError):
        parse_fps(value)
