"""torchvision's MobileNetV2 as a Keras model, so that its ImageNet state dict gives the features torchvision gives.

keras.applications.MobileNetV2 differs in two ways that change every feature: its stride-2 convolutions pad one
pixel on the bottom and right only (torchvision pads one on every side) and its batch norm adds 1e-3 to the variance
(torchvision 1e-5). Here every 3x3 convolution pads one pixel on every side and batch norm uses 1e-5; layers are named
after the state dict's keys (dots as underscores), so each weight is set by name.
"""
import numpy as np

# (expansion, output channels, blocks, first block's stride), torchvision's inverted_residual_setting
BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
FIRST_CHANNELS, LAST_CHANNELS = 32, 1280
BATCH_NORM_EPSILON = 1e-5
FEATURE_DIM = LAST_CHANNELS


def build(image_size, dtype=None):
    """The network up to its global average pool: images (n, size, size, 3) normalised as torchvision normalises
    them -> (n, 1280)."""
    import keras

    layers = keras.layers

    def conv_bn(x, name, channels, kernel=1, stride=1, depthwise=False, relu=True):
        if kernel == 3:
            x = layers.ZeroPadding2D(1, dtype=dtype, name=f"{name}_pad")(x)
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, stride, use_bias=False, dtype=dtype, name=f"{name}_0")(x)
        else:
            x = layers.Conv2D(channels, kernel, stride, use_bias=False, dtype=dtype, name=f"{name}_0")(x)
        x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, dtype=dtype, name=f"{name}_1")(x)
        return layers.ReLU(6.0, dtype=dtype, name=f"{name}_relu")(x) if relu else x

    images = keras.Input((image_size, image_size, 3), name="images")
    x = conv_bn(images, "features_0", FIRST_CHANNELS, 3, 2)
    index, channels = 1, FIRST_CHANNELS
    for expansion, out_channels, count, first_stride in BLOCKS:
        for repeat in range(count):
            stride, name = first_stride if repeat == 0 else 1, f"features_{index}_conv"
            y, part = x, 0
            if expansion != 1:
                y = conv_bn(y, f"{name}_0", channels * expansion)
                part = 1
            y = conv_bn(y, f"{name}_{part}", None, 3, stride, depthwise=True)
            # the linear projection: torchvision's conv.{part+1} (a bare conv) and conv.{part+2} (its batch norm)
            y = layers.Conv2D(out_channels, 1, use_bias=False, dtype=dtype, name=f"{name}_{part + 1}")(y)
            y = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, dtype=dtype, name=f"{name}_{part + 2}")(y)
            residual = stride == 1 and channels == out_channels
            x = layers.Add(dtype=dtype, name=f"features_{index}_add")([x, y]) if residual else y
            index, channels = index + 1, out_channels
    x = conv_bn(x, f"features_{index}", LAST_CHANNELS)
    pooled = layers.GlobalAveragePooling2D(dtype=dtype, name="avg_pool")(x)
    return keras.Model(images, pooled, name="mobilenet_v2_torchvision")


def load_state_dict(model, state_dict):
    """Set every weight of `model` (build's) from torchvision's state dict {name: array}; the classifier and the
    batch-norm counters are not used. ValueError if a weight is missing or has another shape."""
    used = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = layer.name.replace("_", ".")
        if not all(f"{prefix}.{name}" in state_dict for name in ("weight",)):
            raise ValueError(f"the state dict has no {prefix}.weight")
        if type(layer).__name__ == "BatchNormalization":
            names = ("weight", "bias", "running_mean", "running_var")
            values = [state_dict[f"{prefix}.{name}"] for name in names]
        else:
            names = ("weight",)
            kernel = state_dict[f"{prefix}.weight"]  # (out, in / groups, h, w)
            depthwise = type(layer).__name__ == "DepthwiseConv2D"
            values = [kernel.transpose(2, 3, 0, 1) if depthwise else kernel.transpose(2, 3, 1, 0)]
        layer.set_weights([np.asarray(v, np.float32) for v in values])
        used.update(f"{prefix}.{name}" for name in names)
    unused = [k for k in state_dict if k not in used and not k.startswith("classifier.")
              and not k.endswith(".num_batches_tracked")]
    if unused:
        raise ValueError(f"{len(unused)} weights of the state dict have no layer here, e.g. {unused[0]}")
