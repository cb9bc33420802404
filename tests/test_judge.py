"""The judge: which local answers are good enough, and why the others are hard cases."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgewire.config import JudgeSettings
from edgewire.demo.models import DemoArtifacts, build_demo, label_of
from edgewire.edge.judge import BLURRY, LOW_CONFIDENCE, LOW_MARGIN, UNKNOWN_CLASS, Judge
from edgewire.preprocess import sharpness

LABELS = ("cat", "dog", "bird", "other")


def judge(**settings: object) -> Judge:
    return Judge(JudgeSettings(**settings), LABELS)


def rows(*values: list[float]) -> np.ndarray:
    # Every probability used below is a dyadic fraction, exact in binary, so a value "at the
    # threshold" really is equal to it and the boundary is tested, not rounding noise.
    return np.array(values, dtype=np.float64)


# ---- predictions ------------------------------------------------------------------------


def test_prediction_fields_for_handmade_rows() -> None:
    j = judge(min_confidence=0.0)
    probs = rows(
        [0.625, 0.25, 0.125, 0.0],  # best in the first column
        [0.0, 0.125, 0.25, 0.625],  # best in the last column
        [0.125, 0.5, 0.375, 0.0],  # best in the middle, close runner-up
        [0.25, 0.25, 0.25, 0.25],  # four-way tie: margin 0
    )
    verdicts = j.judge(probs)
    assert len(verdicts) == 4

    expected = [("cat", 0, 0.625, 0.375), ("other", 3, 0.625, 0.375), ("dog", 1, 0.5, 0.125)]
    for verdict, (label, index, conf, margin) in zip(verdicts, expected, strict=False):
        p = verdict.prediction
        assert (p.label, p.class_index) == (label, index)
        assert p.confidence == conf
        assert p.margin == margin
        assert p.label == LABELS[p.class_index]

    tie = verdicts[3].prediction
    assert tie.confidence == 0.25 and tie.margin == 0.0 and tie.class_index == 0
    assert tie.label == LABELS[tie.class_index]


def test_a_tie_picks_the_first_of_the_tied_classes() -> None:
    p = judge(min_confidence=0.0).judge(rows([0.0, 0.5, 0.5, 0.0]))[0].prediction
    assert p.class_index == 1
    assert p.label == LABELS[p.class_index]
    assert (p.confidence, p.margin) == (0.5, 0.0)


def test_predictions_match_a_sorting_reference_on_a_random_batch() -> None:
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.ones(len(LABELS)), size=200).astype(np.float32)
    verdicts = judge().judge(probs)
    ordered = np.sort(probs, axis=1)
    for i, verdict in enumerate(verdicts):
        p = verdict.prediction
        assert p.class_index == int(np.argmax(probs[i]))
        assert p.label == LABELS[p.class_index]
        assert p.confidence == pytest.approx(float(ordered[i, -1]))
        assert p.margin == pytest.approx(float(ordered[i, -1] - ordered[i, -2]))
        assert isinstance(p.confidence, float) and isinstance(p.margin, float)


def test_single_class_model_has_margin_equal_to_confidence() -> None:
    j = Judge(JudgeSettings(min_confidence=0.5), ("only",))
    verdicts = j.judge(rows([1.0], [0.25]))
    assert [v.prediction.label for v in verdicts] == ["only", "only"]
    assert [v.prediction.margin for v in verdicts] == [1.0, 0.25]
    assert verdicts[0].reasons == ()
    assert verdicts[1].reasons == (LOW_CONFIDENCE,)


def test_class_count_mismatch_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"5 classes but declares 4 labels"):
        judge().judge(np.full((2, 5), 0.2))
    with pytest.raises(ValueError, match=r"3 classes"):
        judge().judge(np.full((1, 3), 1 / 3))


def test_empty_batch_gives_no_verdicts() -> None:
    assert judge().judge(np.zeros((0, len(LABELS)))) == []


# ---- policies ---------------------------------------------------------------------------


def test_min_confidence_fires_below_and_stays_quiet_at_the_threshold() -> None:
    j = judge(min_confidence=0.5)
    verdicts = j.judge(
        rows(
            [0.5, 0.25, 0.25, 0.0],  # exactly at the threshold: good enough
            [0.375, 0.3125, 0.3125, 0.0],  # below
            [0.75, 0.125, 0.125, 0.0],  # above
        )
    )
    assert [v.reasons for v in verdicts] == [(), (LOW_CONFIDENCE,), ()]
    assert [v.hard for v in verdicts] == [False, True, False]


def test_min_confidence_fires_just_above_the_value() -> None:
    threshold = float(np.nextafter(0.5, 1.0))
    verdict = judge(min_confidence=threshold).judge(rows([0.5, 0.25, 0.25, 0.0]))[0]
    assert verdict.reasons == (LOW_CONFIDENCE,)


def test_min_margin_fires_below_and_stays_quiet_at_the_threshold() -> None:
    j = judge(min_confidence=0.0, min_margin=0.25)
    verdicts = j.judge(
        rows(
            [0.5, 0.25, 0.25, 0.0],  # margin 0.25: at the threshold
            [0.5, 0.375, 0.125, 0.0],  # margin 0.125: below
            [0.0, 0.125, 0.875, 0.0],  # margin 0.75: above
        )
    )
    assert [v.reasons for v in verdicts] == [(), (LOW_MARGIN,), ()]


def test_default_min_margin_never_fires_even_on_a_tie() -> None:
    verdict = judge(min_confidence=0.0).judge(rows([0.5, 0.5, 0.0, 0.0]))[0]
    assert verdict.prediction.margin == 0.0
    assert LOW_MARGIN not in verdict.reasons


def test_unknown_labels_fire_only_when_they_win() -> None:
    j = judge(min_confidence=0.0, unknown_labels=["other"])
    verdicts = j.judge(
        rows(
            [0.125, 0.125, 0.125, 0.625],  # "other" wins
            [0.5, 0.0, 0.125, 0.375],  # "other" is only the runner-up
        )
    )
    assert verdicts[0].prediction.label == "other"
    assert verdicts[0].reasons == (UNKNOWN_CLASS,)
    assert verdicts[1].reasons == ()


def test_unknown_labels_accept_several_and_ignore_labels_not_in_the_model() -> None:
    j = judge(min_confidence=0.0, unknown_labels=["bird", "other", "not-a-label"])
    verdicts = j.judge(rows([0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]))
    assert [v.reasons for v in verdicts] == [(UNKNOWN_CLASS,), (UNKNOWN_CLASS,), ()]


def test_min_sharpness_marks_blurry_frames_below_the_threshold() -> None:
    j = judge(min_confidence=0.0, min_sharpness=100.0)
    assert j.wants_sharpness
    good = [1.0, 0.0, 0.0, 0.0]
    verdicts = j.judge(rows(good, good, good, good), sharpness=[99.5, 100.0, None, 2500.0])
    assert [v.reasons for v in verdicts] == [(BLURRY,), (), (), ()]
    # The measured value travels with the verdict, whatever the policy decided.
    assert [v.sharpness for v in verdicts] == [99.5, 100.0, None, 2500.0]


def test_sharpness_policy_off_never_marks_blurry() -> None:
    j = judge(min_confidence=0.0)
    assert not j.wants_sharpness
    verdict = j.judge(rows([1.0, 0.0, 0.0, 0.0]), sharpness=[0.0])[0]
    assert verdict.reasons == ()
    assert verdict.sharpness == 0.0


def test_no_sharpness_given_means_no_blur_verdict() -> None:
    verdicts = judge(min_confidence=0.0, min_sharpness=100.0).judge(rows([1.0, 0.0, 0.0, 0.0]))
    assert verdicts[0].reasons == ()
    assert verdicts[0].sharpness is None


def test_reasons_accumulate_in_a_fixed_order() -> None:
    j = judge(min_confidence=0.5, min_margin=0.25, unknown_labels=["other"], min_sharpness=50.0)
    verdicts = j.judge(
        rows(
            [0.25, 0.125, 0.25, 0.375],  # low confidence, low margin, "other" wins
            [0.0, 0.0, 0.25, 0.75],  # only "other"
            [0.875, 0.125, 0.0, 0.0],  # fine
        ),
        sharpness=[10.0, 10.0, 60.0],
    )
    assert verdicts[0].reasons == (LOW_CONFIDENCE, LOW_MARGIN, UNKNOWN_CLASS, BLURRY)
    assert verdicts[1].reasons == (UNKNOWN_CLASS, BLURRY)
    assert verdicts[2].reasons == ()
    assert [v.hard for v in verdicts] == [True, True, False]


def test_rows_are_judged_independently() -> None:
    j = judge(min_confidence=0.5)
    low, high = [0.375, 0.3125, 0.3125, 0.0], [1.0, 0.0, 0.0, 0.0]
    batch = j.judge(rows(low, high, low, high))
    singles = [j.judge(rows(r))[0] for r in (low, high, low, high)]
    assert batch == singles


# ---- sharpness on a real frame ----------------------------------------------------------


@pytest.fixture(scope="module")
def demo_frames(tmp_path_factory: pytest.TempPathFactory) -> DemoArtifacts:
    return build_demo(tmp_path_factory.mktemp("judge-demo"))


def _frame(arts: DemoArtifacts) -> Path:
    frame = sorted(arts.frames_dir.glob("*.jpg"))[0]
    label_of(frame)  # a real demo frame, named <index>-<label>.jpg
    return frame


def test_blurred_demo_frame_is_less_sharp(demo_frames: DemoArtifacts) -> None:
    image = cv2.imread(str(_frame(demo_frames)), cv2.IMREAD_COLOR)
    assert image is not None and image.ndim == 3
    blurred = cv2.GaussianBlur(image, (9, 9), 3.0)

    original, soft = sharpness(image), sharpness(blurred)
    assert original > 0
    assert soft < original / 2
    # Gray input measures the same thing without a colour conversion.
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    assert sharpness(gray) == pytest.approx(original, rel=1e-6)

    # And the judge, given those values, escalates the blurred one only.
    threshold = (original + soft) / 2
    j = Judge(JudgeSettings(min_confidence=0.0, min_sharpness=threshold), tuple(str(i) for i in range(10)))
    probs = np.eye(10)[[3, 3]]
    sharp_v, blur_v = j.judge(probs, sharpness=[original, soft])
    assert sharp_v.reasons == ()
    assert blur_v.reasons == (BLURRY,)


def test_flat_image_has_zero_sharpness() -> None:
    assert sharpness(np.full((32, 32), 128, np.uint8)) == 0.0
    checker = (np.indices((32, 32)).sum(axis=0) % 2 * 255).astype(np.uint8)
    assert sharpness(checker) > 1000.0


# ---- the batch's columns ------------------------------------------------------------------


def test_batch_columns_agree_with_the_per_frame_verdicts() -> None:
    rng = np.random.default_rng(11)
    probs = rng.dirichlet(np.ones(len(LABELS)) * 0.7, size=64).astype(np.float32)
    sharp: list[float | None] = [float(v) for v in rng.uniform(0, 100, size=64)]
    sharp[3] = None
    j = judge(min_confidence=0.6, min_margin=0.2, unknown_labels=["bird"], min_sharpness=30.0)
    batch = j.judge_batch(probs, sharp)
    verdicts = j.judge(probs, sharp)
    assert len(batch) == len(verdicts) == 64
    assert batch.hard == [i for i, v in enumerate(verdicts) if v.hard]
    assert 0 < len(batch.hard) < 64
    for i, v in enumerate(verdicts):
        p = v.prediction
        assert (batch.labels[i], batch.class_index[i]) == (p.label, p.class_index)
        assert (batch.confidence[i], batch.margin[i]) == (p.confidence, p.margin)
        assert type(batch.confidence[i]) is float and type(batch.class_index[i]) is int
        assert batch.reasons[i] == v.reasons and batch.sharpness[i] == v.sharpness
        assert p.confidence == float(np.max(probs[i]))


def test_every_reason_of_a_frame_is_listed_in_policy_order() -> None:
    j = judge(min_confidence=0.5, min_margin=0.25, unknown_labels=["cat"], min_sharpness=10.0)
    batch = j.judge_batch(rows([0.375, 0.3125, 0.3125, 0.0]), [1.0])
    assert batch.reasons == [(LOW_CONFIDENCE, LOW_MARGIN, UNKNOWN_CLASS, BLURRY)]
    assert batch.hard == [0]
