"""Re-identification (issue 30 item 4): the lost-objects book (worker/model/reid.py), the embeddings read
from a running SAM 3 TextTracker (worker/model/sam3/embeddings.py), and the recommended embedding's
separation on bench/bench_reid.py's synthetic clip, where a red ball leaves the picture and comes back.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.bench_reid import BALL, BOX, LOOKALIKE, TRIANGLE, Clip, H, W, make_clip, return_frames
from schemas.errors import ConfigError, SchemaError
from worker.model.reid import (
    RECOMMENDED_THRESHOLD,
    Match,
    ReidBook,
    embedding_similarity,
)
from worker.model.sam3 import embeddings
from worker.model.sam3.build import load_tiny
from worker.model.sam3.tracker import TextTracker

A = np.array([1.0, 0.0, 0.0])
B = np.array([0.0, 1.0, 0.0])
NEAR_A = np.array([0.95, 0.3, 0.0])  # cosine ~0.954 to A


def same(found: Match | None, obj_id: int, similarity: float, gone_s: float) -> bool:
    return (found is not None and found.obj_id == obj_id and abs(found.similarity - similarity) < 1e-3
            and abs(found.gone_s - gone_s) < 1e-9)


def test_an_object_lost_and_seen_again_within_the_window_gets_its_id_back() -> None:
    book = ReidBook(window_s=5.0, threshold=0.9)
    book.lost(7, A, at_s=10.0, label="ball")
    found = book.match(NEAR_A, at_s=12.5, label="ball")
    assert same(found, 7, 0.954, 2.5)
    assert 7 not in book and len(book) == 0


def test_an_id_comes_back_once() -> None:
    book = ReidBook(window_s=5.0, threshold=0.9)
    book.lost(7, A, at_s=0.0)
    assert book.match(A, at_s=1.0) is not None
    assert book.match(A, at_s=1.0) is None


def test_no_match_after_the_window_and_old_entries_are_dropped() -> None:
    book = ReidBook(window_s=5.0, threshold=0.9)
    book.lost(7, A, at_s=0.0)
    book.lost(8, B, at_s=3.0)
    assert book.match(A, at_s=5.01) is None
    assert 7 not in book and 8 in book
    assert book.expire(8.5) == [8] and len(book) == 0


def test_the_edge_of_the_window_still_matches() -> None:
    book = ReidBook(window_s=5.0, threshold=0.9)
    book.lost(7, A, at_s=1.0)
    assert same(book.match(A, at_s=6.0), 7, 1.0, 5.0)


def test_below_the_threshold_no_match_and_the_entry_stays() -> None:
    book = ReidBook(window_s=5.0, threshold=0.96)
    book.lost(7, A, at_s=0.0)
    assert book.match(NEAR_A, at_s=1.0) is None
    assert 7 in book


def test_a_ball_never_becomes_a_player_but_an_unlabelled_object_may_match_either() -> None:
    book = ReidBook(window_s=5.0, threshold=0.9)
    book.lost(7, A, at_s=0.0, label="ball")
    assert book.match(A, at_s=1.0, label="player") is None
    assert same(book.match(A, at_s=1.0, label=""), 7, 1.0, 1.0)
    book.lost(9, A, at_s=0.0, label="")
    assert book.match(A, at_s=1.0, label="player") is not None


def test_the_most_alike_of_several_wins() -> None:
    book = ReidBook(window_s=5.0, threshold=0.5)
    book.lost(1, B, at_s=0.0)
    book.lost(2, NEAR_A, at_s=0.0)
    book.lost(3, A, at_s=0.5)
    book.lost(4, A, at_s=0.5, label="ball")
    found = book.match(A + 0.01 * B, at_s=1.0, label="player")
    assert found is not None and found.obj_id == 3
    assert sorted(i for i in (1, 2, 3, 4) if i in book) == [1, 2, 4]


def test_forget_and_a_full_book_drops_the_oldest() -> None:
    book = ReidBook(window_s=60.0, threshold=0.9, max_lost=2)
    book.lost(1, A, at_s=0.0)
    book.lost(2, A, at_s=2.0)
    book.lost(3, A, at_s=1.0)
    assert 1 not in book and 2 in book and 3 in book
    book.forget(2)
    book.forget(99)
    assert len(book) == 1


def test_the_state_round_trips_through_json() -> None:
    book = ReidBook(window_s=4.0, threshold=0.75, max_lost=8)
    book.lost(3, np.array([0.2, -0.4, 0.1]), at_s=1.5, label="ball")
    book.lost(5, B, at_s=2.0)
    again = ReidBook.from_dict(json.loads(json.dumps(book.to_dict())))
    assert again.to_dict() == book.to_dict()
    assert (again.window_s, again.threshold, again.max_lost) == (4.0, 0.75, 8)
    found = again.match(np.array([0.2, -0.4, 0.1]), at_s=3.0, label="ball")
    assert found is not None and found.obj_id == 3 and found.similarity == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(SchemaError, match="does not decode"):
        ReidBook.from_dict({"window_s": 1.0})


@pytest.mark.parametrize(("window_s", "threshold", "max_lost", "says"), [
    (-1.0, 0.5, 64, "reid_window_s"),
    (float("nan"), 0.5, 64, "reid_window_s"),
    (5.0, 1.5, 64, "reid_threshold"),
    (5.0, -1.01, 64, "reid_threshold"),
    (5.0, 0.5, 0, "max_lost"),
])
def test_bad_settings_are_a_one_line_config_error(window_s: float, threshold: float, max_lost: int,
                                                 says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        ReidBook(window_s, threshold, max_lost)
    assert "\n" not in str(caught.value) and "but got" in str(caught.value)


def test_similarity_is_cosine_and_zero_for_a_zero_vector() -> None:
    assert embedding_similarity(A, NEAR_A) == pytest.approx(0.95 / np.hypot(0.95, 0.3))
    assert embedding_similarity(A, -A) == pytest.approx(-1.0)
    assert embedding_similarity(A, np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="same length"):
        embedding_similarity(A, np.ones(4))
    book = ReidBook(window_s=5.0, threshold=0.0)
    book.lost(1, np.zeros(3), at_s=0.0)  # a zero embedding matches nothing above 0 and nothing crashes
    assert book.match(np.zeros(3), at_s=0.0) == Match(1, 0.0, 0.0)


@pytest.fixture(scope="module")
def clip() -> Clip:
    return make_clip(60, seed=0)


def test_each_embedding_of_an_instance_on_the_tiny_tracker_is_a_finite_vector(clip: Clip) -> None:
    torch.set_num_threads(2)
    sam3 = load_tiny(seed=0)
    tracker = TextTracker(sam3, ["object"], width=W, height=H, num_frames=None)
    for frame in clip.frames[:3]:
        tracker.step(frame)
    newest = tracker.position - 1
    ids = list(tracker.session.obj_ids)
    assert ids, "the tiny model must track something, or this checks nothing"
    hidden = int(sam3.model.tracker_model.hidden_dim)  # 128 tiny, 256 real
    for frame_idx in range(newest + 1):  # the pointers of every frame the session still holds
        pointer = embeddings.object_pointer(tracker, ids[0], frame_idx)
        assert pointer is not None and pointer.shape == (hidden,) and np.isfinite(pointer).all()
    mask = embeddings.tracked_mask(tracker, ids[0], newest)
    assert mask is not None and mask.dtype == bool and mask.shape == (112, 112)
    truth = clip.masks[newest][BALL]
    pooled = embeddings.pooled_features(tracker, truth, newest)
    assert pooled is not None and pooled.shape == (16 + 32 + 128,) and np.isfinite(pooled).all()
    assert pooled.dtype == np.float32
    made = embeddings.mask_object_pointer(tracker, truth, newest)
    assert made is not None and made.shape == (hidden,) and np.isfinite(made).all()
    hist = embeddings.colour_histogram(clip.frames[newest], truth)
    assert hist.shape == (8 * 8 * 2,) and np.linalg.norm(hist) == pytest.approx(1.0)  # square roots of shares
    # what the session no longer holds is None, and asking never creates an entry
    assert embeddings.pooled_features(tracker, truth, 0) is None  # features: the newest frame only
    assert embeddings.mask_object_pointer(tracker, truth, 0) is None
    assert embeddings.object_pointer(tracker, 999, newest) is None
    assert embeddings.pooled_features(tracker, np.zeros((H, W), bool), newest) is None
    assert list(tracker.session.obj_ids) == ids
    assert not embeddings.colour_histogram(clip.frames[0], np.zeros((H, W), bool)).any()
    tracker.close()


def test_the_ball_that_left_gets_its_id_back_and_other_objects_do_not(clip: Clip) -> None:
    """The recommended embedding (the colour histogram) with the recommended threshold, on ground-truth
    masks: the ball's last good view before it left is filed; at its first good view after it came back
    it is recognised, while the other objects on that frame (the look-alike red ball included) are not."""
    fps = 10.0
    before, after = return_frames(clip, [])

    def hist(name: str, t: int) -> np.ndarray:
        return embeddings.colour_histogram(clip.frames[t], clip.masks[t][name])

    for other in (BOX, TRIANGLE, LOOKALIKE):
        book_of_one = ReidBook(window_s=5.0, threshold=RECOMMENDED_THRESHOLD)
        book_of_one.lost(1, hist(BALL, before), at_s=before / fps)
        assert book_of_one.match(hist(other, after), at_s=after / fps) is None, other
    book = ReidBook(window_s=5.0, threshold=RECOMMENDED_THRESHOLD)
    book.lost(1, hist(BALL, before), at_s=before / fps)
    book.lost(2, hist(LOOKALIKE, before), at_s=before / fps)  # filed too: the ball must still pick its own id
    found = book.match(hist(BALL, after), at_s=after / fps)
    assert found is not None and found.obj_id == 1 and found.similarity >= RECOMMENDED_THRESHOLD
    assert found.gone_s == pytest.approx((after - before) / fps)
    assert 2 in book
