"""A reader of ``.safetensors`` files that memory-maps them like torch does ``.ckpt`` files: every tensor is a view
of one private mapping of the file, so nothing is read until it is used, and a malformed file is refused in one
line (offsets outside the data, shapes that do not match, an oversized header)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ldm.errors import CheckpointError, first_line

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_SAFETENSORS_HEADER = 100 * 2**20


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of one private memory map of it (no data is read yet)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"cannot read {path}: not a valid safetensors file ({why})")

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad("shorter than its 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n < 2 or n > min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise bad(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise bad(first_line(err)[:200]) from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    start, data_size = 8 + n, size - 8 - n
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size) if data_size else None
    out = {}
    for key, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry '{key}' has no valid dtype, shape and data_offsets") from None
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != numel * itemsize:
            raise bad(f"entry '{key}' lies outside the data or does not match its shape")
        offset = start + begin
        if numel == 0:
            out[key] = torch.empty(shape, dtype=dtype)
        elif offset % itemsize == 0:
            out[key] = torch.empty(0, dtype=dtype).set_(storage, offset // itemsize, shape)
        else:  # unaligned: copy the bytes out
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, [end - begin])
            out[key] = raw.clone().view(dtype).reshape(shape)
    return out
