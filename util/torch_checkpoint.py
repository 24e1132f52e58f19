"""Read a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format into numpy arrays, without torch.

The file is a sequence of pickles: a magic number, the protocol version, the system's sizes, the state dict (its
tensors refer to storages by key), the storage keys in order; then each storage's element count (int64) and raw
little-endian data. The state dict is unpickled with an Unpickler that admits only the names a state dict of
tensors needs, so a file that would run other code is refused rather than run.
"""
import collections
import pickle
import struct

import numpy as np

from util.errors import DataError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
                  "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
                  "BoolStorage": "?"}


class _Storage:
    """A storage named in the pickle, its data read after it."""

    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.data = np.dtype(dtype), numel, None


class _Tensor:
    """torch._utils._rebuild_tensor_v2's arguments, made into an array once the storages are read."""

    def __init__(self, storage, offset, size, stride, *unused):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self):
        item = self.storage.dtype.itemsize
        end = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1 if all(self.size) else 0
        if end > self.storage.numel:
            raise pickle.UnpicklingError("a tensor reaches past its storage")
        view = np.lib.stride_tricks.as_strided(self.storage.data[self.offset:], self.size,
                                               tuple(s * item for s in self.stride))
        return view.astype(self.storage.dtype.newbyteorder("="))  # a copy in native byte order


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict of tensors")

    def persistent_load(self, saved_id):
        kind, dtype, key, _location, numel, view = saved_id
        if kind != "storage" or view is not None or dtype not in STORAGE_DTYPES.values():
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r}")
        return self.storages.setdefault(key, _Storage(dtype, numel))


def read_state_dict(path):
    """{name: numpy array} of the tensors in a legacy-format .pth file; DataError naming the file otherwise."""
    try:
        with open(path, "rb") as file:
            return _read(file)
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error) as error:
        raise DataError(f"{path}: not a legacy PyTorch state dict of tensors ({error})") from None


def _read(file):
    if file.read(2) == b"PK":
        raise ValueError("a zip-format checkpoint (PyTorch 1.6 or later), not the legacy format")
    file.seek(0)
    header = [_StateDictUnpickler(file).load() for _ in range(3)]  # magic, protocol, system info
    if header[0] != LEGACY_MAGIC or header[1] != LEGACY_PROTOCOL or not header[2].get("little_endian"):
        raise ValueError("no legacy magic number, or not little-endian")
    unpickler = _StateDictUnpickler(file)
    state = unpickler.load()
    keys = _StateDictUnpickler(file).load()
    for key in keys:
        storage = unpickler.storages[key]
        (count,) = struct.unpack("<q", file.read(8))
        if count != storage.numel:
            raise ValueError(f"storage {key} holds {count} elements, {storage.numel} expected")
        storage.data = np.frombuffer(file.read(count * storage.dtype.itemsize), storage.dtype, count)
    if not isinstance(state, dict) or not all(isinstance(v, _Tensor) for v in state.values()):
        raise ValueError("the pickle is not a dict of tensors")
    return {name: tensor.array() for name, tensor in state.items()}
