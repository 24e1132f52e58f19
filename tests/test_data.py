import numpy as np
import pytest

from util.data import (FeatureFiles, batch_arrays, batches, encode_captions, epoch_pairs, find_feat_dir,
                       load_feature_file, load_features, load_labels, read_ids, replica_slices)
from util.errors import DataError
from util.vocab import PAD, Vocabulary


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


def test_batches_pad_each_batch_to_its_longest_caption_and_skip_batches():
    features = np.arange(3 * 2 * 2, dtype=np.float16).reshape(3, 2, 2)
    captions = np.array([[5, 2, 0, 0], [5, 5, 5, 2], [2, 0, 0, 0]], np.int32)
    got = list(batches(features, np.array([0, 1, 2], np.int32), captions, batch_size=2))
    assert [len(parts) for parts in got] == [1, 1]  # one slice per batch by default
    (first_features, first_captions), = got[0]
    (last_features, last_captions), = got[1]
    assert first_captions.shape == (2, 4) and last_captions.shape == (1, 1)
    np.testing.assert_array_equal(first_captions, captions[:2])
    np.testing.assert_array_equal(last_captions, [[2]])
    assert first_features.dtype == np.float32 and last_features.shape == (1, 2, 2)
    np.testing.assert_array_equal(first_features, features[:2].astype(np.float32))
    np.testing.assert_array_equal(last_features, features[2:].astype(np.float32))
    skipped = list(batches(features, np.array([0, 1, 2], np.int32), captions, batch_size=2, skip_batches=1))
    assert len(skipped) == 1 and skipped[0][0][1].shape == (1, 1)
    np.testing.assert_array_equal(skipped[0][0][0], last_features)
    assert list(batches(features, np.array([0, 1, 2], np.int32), captions, batch_size=2, skip_batches=2)) == []


def test_batches_gather_features_by_video_index_in_the_given_order():
    features = np.random.default_rng(0).normal(size=(4, 3, 2)).astype(np.float16)
    video_index = np.array([3, 0, 3, 2, 1], np.int32)
    captions = np.array([[6, 2], [7, 2], [8, 2], [9, 2], [10, 2]], np.int32)
    got = [part for parts in batches(features, video_index, captions, batch_size=3) for part in parts]
    np.testing.assert_array_equal(np.concatenate([f for f, _ in got]), features[video_index].astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([c for _, c in got]), captions)


def test_batch_arrays_rows_pad_with_empty_rows_and_width_rounds_up():
    features = np.arange(3 * 2 * 2, dtype=np.float16).reshape(3, 2, 2)
    captions = np.array([[5, 6, 7, 2, 0], [5, 2, 0, 0, 0]], np.int32)
    frame_features, padded = batch_arrays(features, np.array([2, 0], np.int32), captions, rows=4, width_multiple=3)
    assert frame_features.shape == (4, 2, 2) and padded.shape == (4, 6)  # 4 tokens rounded up to 6
    np.testing.assert_array_equal(frame_features[:2], features[[2, 0]].astype(np.float32))
    assert not frame_features[2:].any()  # the empty rows' features are zeros
    np.testing.assert_array_equal(padded[:2], [[5, 6, 7, 2, 0, 0], [5, 2, 0, 0, 0, 0]])
    assert (padded[2:] == PAD).all()  # empty rows are all <PAD>: they count for nothing in the loss
    # width_multiple rounds past the encoded width: the extra columns are <PAD>
    _, wide = batch_arrays(features, np.array([2, 0], np.int32), captions, width_multiple=8)
    assert wide.shape == (2, 8) and (wide[:, 5:] == PAD).all()
    np.testing.assert_array_equal(wide[:, :5], captions)
    # rows never cut a batch, and width 1 is the least
    frame_features, exact = batch_arrays(features, np.array([2, 0], np.int32), captions, rows=1)
    assert frame_features.shape == (2, 2, 2) and exact.shape == (2, 4)
    frame_features, empty = batch_arrays(features, np.zeros(0, np.int32), captions[:0], rows=2, width_multiple=8)
    assert frame_features.shape == (2, 2, 2) and empty.shape == (2, 8) and (empty == PAD).all()


def test_batches_pad_every_part_to_rows_and_width_multiple():
    features = np.ones((3, 2, 2), np.float16)
    captions = np.array([[5, 2, 0, 0], [5, 5, 5, 2], [2, 0, 0, 0]], np.int32)
    got = list(batches(features, np.array([0, 1, 2], np.int32), captions, batch_size=2, rows=2, width_multiple=8))
    assert [[(f.shape, c.shape) for f, c in parts] for parts in got] == [[((2, 2, 2), (2, 8))]] * 2
    (frame_features, last), = got[1]
    np.testing.assert_array_equal(last, [[2] + [PAD] * 7, [PAD] * 8])
    np.testing.assert_array_equal(frame_features[1], 0)


def test_replica_slices_split_every_global_batch_evenly():
    starts, stops = replica_slices(pairs=10, batch_size=4, replicas=3)
    np.testing.assert_array_equal(starts, [[0, 1, 2], [4, 5, 6], [8, 8, 9]])
    np.testing.assert_array_equal(stops, [[1, 2, 4], [5, 6, 8], [8, 9, 10]])
    starts, stops = replica_slices(pairs=10, batch_size=4, replicas=3, skip_batches=2)
    np.testing.assert_array_equal(starts, [[8, 8, 9]])
    np.testing.assert_array_equal(stops, [[8, 9, 10]])
    starts, stops = replica_slices(pairs=1000, batch_size=250, replicas=8, skip_batches=1)
    sizes = stops - starts
    assert starts.shape == (3, 8) and (sizes.sum(axis=1) == 250).all() and (sizes.max(1) - sizes.min(1) <= 1).all()
    assert (starts[:, 1:] == stops[:, :-1]).all() and starts[0, 0] == 250 and stops[-1, -1] == 1000


def test_batches_slices_give_this_process_its_parts_of_every_global_batch():
    """slices=(count, first, local): every global batch cut as replica_slices cuts it, `local` parts from `first` on;
    the parts of all processes together are the whole batch."""
    features = np.arange(5 * 2 * 3, dtype=np.float16).reshape(5, 2, 3)
    video_index = np.arange(10, dtype=np.int32) % 5
    captions = np.array([[4 + i] * (i % 4 + 1) + [2] + [PAD] * (3 - i % 4) for i in range(10)], np.int32)
    starts, stops = replica_slices(10, 4, 3)
    got = list(batches(features, video_index, captions, batch_size=4, slices=(3, 1, 2)))
    assert len(got) == 3 and all(len(parts) == 2 for parts in got)
    for parts, batch_starts, batch_stops in zip(got, starts, stops):
        for (frame_features, caption_ids), a, b in zip(parts, batch_starts[1:], batch_stops[1:]):
            expected = batch_arrays(features, video_index[a:b], captions[a:b])
            np.testing.assert_array_equal(frame_features, expected[0])
            np.testing.assert_array_equal(caption_ids, expected[1])
            np.testing.assert_array_equal(frame_features, features[video_index[a:b]].astype(np.float32))
    np.testing.assert_array_equal(got[0][1][1], captions[2:4, :5])  # pairs 2 and 3: 3 and 4 tokens, then <EOS>
    # three processes of one part each, together: every pair of every batch, once, in order
    together = [list(batches(features, video_index, captions, 4, slices=(3, first, 1))) for first in range(3)]
    assert [len(parts) for parts in together] == [3, 3, 3]
    assert together[0][2][0][1].shape == (0, 1)  # the short last batch (pairs 8, 9) leaves part 0 empty
    for batch in range(3):
        parts = [together[first][batch][0] for first in range(3)]
        np.testing.assert_array_equal(np.concatenate([f for f, _ in parts]),
                                      features[video_index[4 * batch:4 * batch + 4]].astype(np.float32))
        width = max(c.shape[1] for _, c in parts)
        rows = np.concatenate([np.pad(c, ((0, 0), (0, width - c.shape[1]))) for _, c in parts])
        np.testing.assert_array_equal(rows, captions[4 * batch:4 * batch + 4, :width])
    # with skip_batches, the same parts of the later batches
    later = list(batches(features, video_index, captions, batch_size=4, skip_batches=1, slices=(3, 1, 2)))
    assert len(later) == 2
    for parts, expected in zip(later, got[1:]):
        for (f, c), (f_expected, c_expected) in zip(parts, expected):
            np.testing.assert_array_equal(f, f_expected)
            np.testing.assert_array_equal(c, c_expected)


def test_an_error_while_gathering_a_batch_is_raised_to_the_consumer():
    features = np.ones((2, 2, 2), np.float16)
    with pytest.raises(IndexError):
        list(batches(features, np.array([0, 5], np.int32), np.array([[5, 2], [5, 2]], np.int32), batch_size=1))


def test_feature_files_read_like_the_in_memory_store(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        np.save(tmp_path / f"v{i}.avi.npy", rng.normal(size=(4, 3)).astype(np.float64 if i % 2 else np.float32))
    ids = [f"v{i}.avi" for i in range(5)]
    in_memory, files = load_features(tmp_path, ids, 4, 3), FeatureFiles(tmp_path, ids, 4, 3)
    assert files.shape == in_memory.shape and len(files) == 5
    for index in (2, slice(1, 4), np.array([4, 0, 4])):
        np.testing.assert_array_equal(files[index], in_memory[index].astype(np.float32))  # float16 values, both ways
        assert files[index].dtype == np.float32
    assert files[np.array([], int)].shape == (0, 4, 3)


def test_feature_files_check_headers_up_front_and_values_when_read(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 3)))
    np.save(tmp_path / "b.npy", np.ones((4, 5)))
    with pytest.raises(DataError, match="b.npy: features are 5-d, expected 3-d"):
        FeatureFiles(tmp_path, ["a", "b"], 4, 3)
    np.save(tmp_path / "b.npy", np.full((4, 3), np.nan))
    files = FeatureFiles(tmp_path, ["a", "b"], 4, 3)  # values are not read yet
    with pytest.raises(DataError, match="b.npy: holds NaN"):
        files[np.array([0, 1])]
