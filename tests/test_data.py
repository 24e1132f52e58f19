import numpy as np
import pytest

from util.data import (DataError, encode_captions, epoch_pairs, find_feat_dir, load_feature_file, load_features,
                       load_labels, make_dataset, read_ids)
from util.vocab import Vocabulary


def test_real_float64_features_load_as_float32(mlds):
    ids = read_ids(mlds / "testing_data" / "id.txt")
    assert len(ids) == 8 and all(i.endswith(".avi") for i in ids)
    feat_dir = find_feat_dir(mlds / "testing_data" / "id.txt")
    assert np.load(feat_dir / f"{ids[0]}.npy").dtype == np.float64
    features = load_features(feat_dir, ids, frames=80, feature_dim=4096, dtype=np.float32)
    assert features.shape == (8, 80, 4096) and features.dtype == np.float32
    assert np.isfinite(features).all() and features.min() >= 0 and 0.5 < (features == 0).mean() < 0.9


def test_mlds_layout_is_found_from_the_top_level_ids_file(mlds):
    # resolved: ../shared may be a link
    assert find_feat_dir(mlds / "testing_id.txt") == (mlds / "testing_data" / "feat").resolve()


def test_real_labels(mlds):
    labels = load_labels(mlds / "training_label.json")
    assert len(labels) == 1450 and sum(len(c) for _, c in labels) == 24232


def test_ids_tolerate_blank_lines_whitespace_and_windows_line_ends(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_bytes(b"a.avi\r\n\r\nb.avi  \r\n\n")
    assert read_ids(path) == ["a.avi", "b.avi"]


def test_duplicate_ids_warn_and_are_kept_once(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("a\nb\na\n")
    with pytest.warns(UserWarning, match="1 duplicate"):
        assert read_ids(path) == ["a", "b"]


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"id": "a"}', "non-empty JSON list"),
    ('[{"id": "a"}]', "entry 0"),
    ('[{"id": "a", "caption": []}]', "empty or non-list"),
    ('[{"id": "a", "caption": [3]}]', "not a string"),
])
def test_bad_labels_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "training_label.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_labels(path)
    assert str(path) in str(error.value)


def test_bad_feature_files(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.ones((4, 3)))
    assert load_feature_file(good, 4, 3).dtype == np.float32
    with pytest.raises(DataError, match="frames"):
        load_feature_file(good, 5, 3)
    with pytest.raises(DataError, match="3-d"):
        load_feature_file(good, 4, 7)
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((4, 3), np.nan))
    with pytest.raises(DataError, match="NaN"):
        load_feature_file(nan)
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a plain"):
        load_feature_file(pickled)
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(DataError, match="truncated"):
        load_feature_file(truncated)
    with pytest.raises(DataError, match="not found"):
        load_feature_file(tmp_path / "missing.npy")


def test_epoch_pairs_all_and_sample_modes():
    labels = [("v0", ["a b", "a c"]), ("v1", ["b c", "b b", "c"]), ("v2", ["a"])]
    vocab = Vocabulary.build(["a b c"], min_count=1)
    video_index, caption_ids = encode_captions(labels, vocab, max_len=4)
    assert caption_ids.shape == (6, 4) and list(video_index) == [0, 0, 1, 1, 1, 2]
    videos, captions = epoch_pairs(video_index, caption_ids, "all", seed=0, epoch=0)
    assert sorted(videos) == sorted(video_index) and len(captions) == 6
    videos, captions = epoch_pairs(video_index, caption_ids, "sample", seed=0, epoch=0)
    assert sorted(videos) == [0, 1, 2]
    for v, c in zip(videos, captions):  # each sampled caption belongs to its video
        assert any((c == row).all() for row in caption_ids[video_index == v])
    again = epoch_pairs(video_index, caption_ids, "sample", seed=0, epoch=0)
    np.testing.assert_array_equal(again[1], captions)  # same (seed, epoch), same order


def test_dataset_pads_each_batch_to_its_longest_caption():
    features = np.arange(3 * 2 * 2, dtype=np.float16).reshape(3, 2, 2)
    captions = np.array([[5, 2, 0, 0], [5, 5, 5, 2], [2, 0, 0, 0]], np.int32)
    batches = list(make_dataset(features, np.array([0, 1, 2], np.int32), captions, batch_size=2))
    assert batches[0][1].shape == (2, 4) and batches[1][1].shape == (1, 1)
    np.testing.assert_array_equal(batches[0][0].numpy(), features[:2].astype(np.float32))
    skipped = list(make_dataset(features, np.array([0, 1, 2], np.int32), captions, batch_size=2, skip_batches=1))
    assert len(skipped) == 1 and skipped[0][1].shape == (1, 1)
