import pytest

from broker.predictor import StepPredictor, features, pick_for_deadline


def test_learns_step_time_from_shape():
    p = StepPredictor()
    assert p.predict_ms(features("diffusion", {"width": 512, "height": 512})) is None
    truth = lambda mp: 20 + 25 * mp  # noqa: E731
    for i in range(400):
        side = (256, 512, 768, 1024)[i % 4]
        x = features("diffusion", {"width": side, "height": side})
        p.update(x, truth(x[1]))
    for side in (512, 1024):
        x = features("diffusion", {"width": side, "height": side})
        assert p.predict_ms(x) == pytest.approx(truth(x[1]), rel=0.1)


def test_fast_filter_tracks_a_change():
    p = StepPredictor()
    x = [1.0, 0.5]
    for _ in range(50):
        p.update(x, 40.0)
    for _ in range(30):
        p.update(x, 80.0)    # the GPU got slower (contention)
    assert p.predict_ms(x) > 70


def test_round_trip_and_deadline_choice():
    p = StepPredictor()
    p.update([1.0, 1.0], 10.0)
    assert StepPredictor.from_dict(p.to_dict()) == p
    assert pick_for_deadline(["hi", "mid", "lo"], [5000, 2000, 500], 2.5) == 1
    assert pick_for_deadline(["hi", "mid", "lo"], [5000, 4000, 3000], 1.0) == 2
    assert pick_for_deadline(["hi", "lo"], [None, None], 1.0) == 0
