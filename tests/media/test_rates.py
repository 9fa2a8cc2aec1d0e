"""The one frame-rate rule (media/rates.py): what its doc says, exactly."""

from __future__ import annotations

from fractions import Fraction

import pytest

from musetalk_service.media.rates import exact_rate, output_rate


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
