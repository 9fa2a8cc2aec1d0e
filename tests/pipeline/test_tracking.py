"""Box smoothing, keyframe interpolation, face choice and the jitter/lag metrics, on synthetic tracks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from musetalk_service.pipeline.tracking import (
    OneEuroBoxSmoother,
    SmoothingParams,
    box_error,
    box_jitter,
    box_lag,
    frames_to_redetect,
    interpolate_boxes,
    keyframe_positions,
    pick_face,
)

FPS = 25
SETTLE = 50  # frames the filter needs from its first (noisy) sample to a steady state


def _still_track(n: int, size: int = 200) -> np.ndarray:
    return np.tile(np.array([860.0, 440.0, 860.0 + size, 440.0 + size]), (n, 1))


def _head_turn(n: int, amplitude: float = 20.0, hz: float = 0.5) -> np.ndarray:
    """A head swinging left and right (x) while nodding a little (y)."""
    t = np.arange(n) / FPS
    track = _still_track(n)
    track[:, [0, 2]] += (amplitude * np.sin(2 * np.pi * hz * t))[:, None]
    track[:, [1, 3]] += (0.25 * amplitude * np.sin(2 * np.pi * hz * t + 1.0))[:, None]
    return track


def _with_noise(track: np.ndarray, seed: int = 0) -> np.ndarray:
    """Integer detector noise of +-2 px, independent on every edge."""
    return track + np.random.default_rng(seed).integers(-2, 3, track.shape)


def test_still_head_gives_still_box():
    noisy = _with_noise(_still_track(400))
    out = OneEuroBoxSmoother().smooth(noisy)
    assert box_jitter(noisy[SETTLE:]) > 1.5
    assert box_jitter(out[SETTLE:]) < 0.25
    assert all(isinstance(v, int) for box in out for v in box)


def test_head_turn_is_followed_without_lag():
    truth = _head_turn(400)
    noisy = _with_noise(truth)
    out = OneEuroBoxSmoother().smooth(noisy)
    assert box_lag(truth[SETTLE:], out[SETTLE:]) <= 1
    assert box_error(truth[SETTLE:], out[SETTLE:]) < 2.5


def test_box_size_stays_steady_while_the_head_turns():
    # The reason the filter runs on centre/size: the width must not breathe with the motion.
    noisy = _with_noise(_head_turn(400, amplitude=40, hz=1.0))
    out = np.array(OneEuroBoxSmoother().smooth(noisy))[SETTLE:]
    width_in = noisy[SETTLE:, 2] - noisy[SETTLE:, 0]
    width_out = out[:, 2] - out[:, 0]
    assert np.abs(np.diff(width_out)).mean() < 0.3 * np.abs(np.diff(width_in)).mean()


def test_frame_rate_sets_the_time_scale():
    # The same motion sampled at 50 fps: twice the frames, so the lag in frames may double, not more.
    params = dataclasses.replace(SmoothingParams(), fps=50.0)
    t = np.arange(800) / 50.0
    truth = _still_track(800)
    truth[:, [0, 2]] += (20 * np.sin(2 * np.pi * 0.5 * t))[:, None]
    out = OneEuroBoxSmoother(params).smooth(_with_noise(truth))
    assert box_lag(truth[2 * SETTLE :], out[2 * SETTLE :]) <= 2


@pytest.mark.parametrize("bad", [{"min_cutoff": 0}, {"fps": -25}, {"beta": -1}, {"jump_iou": 1.5}])
def test_params_are_checked(bad):
    with pytest.raises(ValueError):
        SmoothingParams(**bad)


def test_gap_resets_the_filter():
    smoother = OneEuroBoxSmoother()
    for box in _with_noise(_still_track(60)):
        smoother.update(box)
    assert smoother.update(None) is None
    elsewhere = (100, 120, 300, 320)
    assert smoother.update(elsewhere) == elsewhere


def test_jump_without_gap_restarts_instead_of_sliding():
    smoother = OneEuroBoxSmoother()
    for box in _still_track(60):
        smoother.update(box)
    elsewhere = (100, 120, 300, 320)
    assert smoother.update(elsewhere) == elsewhere


def test_small_move_is_smoothed_not_restarted():
    smoother = OneEuroBoxSmoother()
    for box in _still_track(60):
        smoother.update(box)
    out = smoother.update((870, 440, 1070, 640))
    assert 860 <= out[0] < 870


def test_interpolation_is_exact_for_linear_motion():
    n = 31
    t = np.arange(n)
    truth = [(100 + 3 * i, 50 - 2 * i, 300 + 3 * i, 250 - i) for i in t]
    keys = list(range(0, n, 5))
    assert interpolate_boxes(keys, [truth[k] for k in keys], n) == truth


def test_interpolation_holds_at_the_ends():
    boxes = interpolate_boxes([3, 7], [(0, 0, 10, 10), (4, 0, 14, 10)], 10)
    assert boxes[:4] == [(0, 0, 10, 10)] * 4
    assert boxes[5] == (2, 0, 12, 10)
    assert boxes[7:] == [(4, 0, 14, 10)] * 3


def test_interpolation_never_invents_a_face_across_a_gap():
    a, b, c = (0, 0, 10, 10), (10, 0, 20, 10), (20, 0, 30, 10)
    keys = [0, 5, 10, 15, 20]
    boxes = interpolate_boxes(keys, [a, b, None, None, c], 22)
    assert boxes[1:5] == [(2, 0, 12, 10), (4, 0, 14, 10), (6, 0, 16, 10), (8, 0, 18, 10)]
    assert boxes[5] == b
    assert boxes[6:20] == [None] * 14
    assert boxes[20:] == [c, c]


def test_interpolation_holds_none_at_the_ends():
    boxes = interpolate_boxes([2, 4], [None, (0, 0, 4, 4)], 6)
    assert boxes == [None, None, None, None, (0, 0, 4, 4), (0, 0, 4, 4)]


@pytest.mark.parametrize("keys", [[0, 0], [3, 1], [-1, 2], [0, 10]])
def test_interpolation_rejects_bad_keyframes(keys):
    with pytest.raises(ValueError):
        interpolate_boxes(keys, [(0, 0, 1, 1)] * len(keys), 10)


@pytest.mark.parametrize(
    ("n", "every", "anchored", "keys"),
    [
        (16, 5, False, [0, 5, 10, 15]),
        (16, 5, True, [3, 7, 11, 15]),  # the anchor at -1 stands in for frame 0
        (16, 8, True, [7, 15]),
        (16, 1, True, list(range(16))),
        (8, 5, False, [0, 3, 7]),  # evenly spread, never two keyframes side by side
        (1, 5, False, [0]),
        (1, 5, True, [0]),
    ],
)
def test_keyframe_positions(n, every, anchored, keys):
    assert keyframe_positions(n, every, anchored) == keys


def test_keyframes_are_never_further_apart_than_asked():
    for n in range(1, 40):
        for every in range(1, 12):
            for anchored in (False, True):
                keys = ([-1] if anchored else []) + keyframe_positions(n, every, anchored)
                assert keys[-1] == n - 1 and max(np.diff(keys), default=1) <= every


def test_frames_to_redetect_covers_transitions_and_jumps():
    near, far = (0, 0, 10, 10), (100, 100, 110, 110)
    keys = [0, 4, 8, 12, 16]
    assert frames_to_redetect(keys, [near, near, None, None, far]) == [5, 6, 7, 13, 14, 15]
    assert frames_to_redetect([0, 4], [near, far]) == [1, 2, 3]
    assert frames_to_redetect([0, 4], [near, (1, 0, 11, 10)]) == []


def test_redetected_frames_make_the_transition_exact():
    # Face present on frames 0..6 only; keyframes every 4 frames miss where it vanished.
    present = [(10 + i, 10, 60 + i, 60) if i <= 6 else None for i in range(13)]
    keys = [0, 4, 8, 12]
    extra = frames_to_redetect(keys, [present[k] for k in keys])
    keys = sorted(keys + extra)
    assert interpolate_boxes(keys, [present[k] for k in keys], 13) == present


def test_pick_face_keeps_the_tracked_face_over_a_larger_one():
    tracked = [100, 100, 200, 200, 0.9]
    larger = [150, 120, 400, 370, 0.99]
    assert pick_face(np.array([larger, tracked]), previous_box=(105, 98, 203, 199)) == (100, 100, 200, 200)


def test_pick_face_takes_the_largest_without_overlap_or_history():
    small = [100, 100, 200, 200, 0.99]
    large = [500, 100, 800, 400, 0.8]
    cands = np.array([small, large])
    assert pick_face(cands, previous_box=None) == (500, 100, 800, 400)
    assert pick_face(cands, previous_box=(1000, 600, 1100, 700)) == (500, 100, 800, 400)


def test_pick_face_with_no_candidate_and_rounding():
    assert pick_face(np.zeros((0, 5)), previous_box=(0, 0, 1, 1)) is None
    assert pick_face(np.array([[-3.2, 4.6, 50.4, 60.5, 0.9]]), None) == (0, 5, 50, 61)


def test_box_lag_finds_a_known_shift():
    truth = _head_turn(200)
    delayed = np.concatenate([np.repeat(truth[:1], 3, axis=0), truth[:-3]])
    assert box_lag(truth, delayed) == 3
    assert box_lag(delayed, truth) == -3
    assert box_error(truth, truth) == 0.0


def test_box_lag_of_a_track_shorter_than_the_largest_shift():
    truth = _head_turn(200)[:4]
    delayed = np.concatenate([truth[:1], truth[:-1]])
    assert box_lag(truth, delayed) == 1
    assert box_lag(truth[:1], truth[:1]) == 0


def test_metrics_skip_frames_without_a_face():
    boxes = [(0, 0, 10, 10), (2, 0, 12, 10), None, (50, 50, 60, 60), (50, 50, 60, 60)]
    assert box_jitter(boxes) == pytest.approx(1.0)
    assert np.isnan(box_jitter([None, (0, 0, 1, 1), None]))
