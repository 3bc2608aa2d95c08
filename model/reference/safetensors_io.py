"""A tiny safetensors reader/writer (no dependency on the `safetensors` package).

File layout: 8-byte little-endian header length N, then N bytes of JSON
{name: {"dtype": "F32"|"BF16"|"F16", "shape": [...], "data_offsets": [begin, end]},
 "__metadata__": {str: str}} (optional), then the raw little-endian, row-major tensor data;
offsets are relative to the first byte after the header. The writer stores tensors in name
order, each 8-byte aligned, and pads the header with spaces to a multiple of 8 bytes.
"""
import json
import struct

import numpy as np
import torch

# dtype name -> (torch dtype, bytes per element, numpy dtype of the raw bits)
_DTYPES = {
    "F32": (torch.float32, 4, np.dtype("<f4")),
    "F16": (torch.float16, 2, np.dtype("<f2")),
    "BF16": (torch.bfloat16, 2, np.dtype("<i2")),
}
_BY_TORCH = {v[0]: k for k, v in _DTYPES.items()}


def _to_bytes(t: torch.Tensor, name: str) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    return t.numpy().astype(_DTYPES[_BY_TORCH[t.dtype]][2], copy=False).tobytes()


def save_file(tensors, path, metadata=None):
    """Writes {name: tensor} to `path`. Tensors must be F32, F16 or BF16 (convert first)."""
    header = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _BY_TORCH:
            raise ValueError(f"{name}: unsupported dtype {t.dtype} (use float32, float16, bfloat16)")
        data = _to_bytes(t, name)
        pad = (-offset) % 8
        if pad:
            blobs.append(b"\0" * pad)
            offset += pad
        header[name] = {
            "dtype": _BY_TORCH[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def load_file(path, with_metadata=False):
    """Reads `path` into {name: torch tensor} in the stored dtype (and the metadata if asked)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} exceeds the file")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    metadata = header.pop("__metadata__", {}) or {}
    for name, info in header.items():
        dtype = info["dtype"]
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: {name}: unsupported dtype {dtype}")
        tdtype, size, npdtype = _DTYPES[dtype]
        shape = [int(d) for d in info["shape"]]
        begin, end = info["data_offsets"]
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * size or base + end > len(raw):
            raise ValueError(f"{path}: {name}: data_offsets {begin},{end} do not match shape {shape}")
        arr = np.frombuffer(raw, dtype=npdtype, count=count, offset=base + begin).copy()
        t = torch.from_numpy(arr)
        if tdtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        out[name] = t.reshape(shape)
    return (out, metadata) if with_metadata else out
