"""Convert a checkpoint (.ckpt, read safely: nothing in it is executed) to .safetensors, optionally in bf16/fp16.

    python scripts/convert_ckpt.py models/ldm/stable-diffusion-v1/model.ckpt              # -> model.safetensors
    python scripts/convert_ckpt.py sd-v1-4.ckpt sd-v1-4-fp16.safetensors --dtype fp16

Every tensor of the state dict is kept under its name (EMA weights included); Lightning's extra entries are
dropped. ``--dtype`` casts floating-point module weights; the noise-schedule buffers (keys without a dot,
such as ``alphas_cumprod``) stay float32, as the loader keeps them. The output is written tensor by tensor to a
temporary file beside it, read back and compared, then published under its name in one step; an existing file
is never overwritten.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import sys
import uuid
from pathlib import Path
from typing import Mapping

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ldm import cli  # noqa: E402
from ldm.errors import InputError, OutputError  # noqa: E402

DTYPES = ("keep", "fp32", "bf16", "fp16")
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="convert_ckpt.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="the checkpoint to convert (.ckpt/.pt/.pth, or .safetensors to change dtype)")
    parser.add_argument("output", nargs="?", help="the .safetensors file to write (default: the checkpoint's "
                                                  "name with .safetensors); must not exist")
    parser.add_argument("--dtype", choices=DTYPES, default="keep",
                        help="cast floating-point weights (schedule buffers stay float32); default: keep")
    return parser


def target_dtypes(state_dict: Mapping, dtype: str) -> dict:
    """key -> dtype to store: floating module weights cast to ``dtype``, schedule buffers (no dot) float32."""
    import torch

    cast = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    out = {}
    for key, tensor in state_dict.items():
        if cast is None or not tensor.is_floating_point():
            out[key] = tensor.dtype
        else:
            out[key] = cast if "." in key else torch.float32
    return out


def write_safetensors(path: Path, state_dict: Mapping, dtypes: Mapping, metadata: Mapping[str, str]) -> None:
    """Write ``state_dict`` (each tensor cast to ``dtypes[key]`` as it is written) in the safetensors format:
    an 8-byte little-endian header length, a JSON header of dtype/shape/data_offsets, then the raw data."""
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    if sys.byteorder != "little":
        raise OutputError("writing safetensors needs a little-endian machine")
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for key, tensor in state_dict.items():
        dtype = dtypes[key]
        if dtype not in names:
            raise InputError(f"tensor {key} has dtype {dtype}, which this converter does not write")
        size = tensor.numel() * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": names[dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, tensor in state_dict.items():
            data = tensor.detach().to("cpu", dtypes[key]).contiguous().reshape(-1)
            f.write(data.view(torch.uint8).numpy().data if data.numel() else b"")
        f.flush()
        os.fsync(f.fileno())


def convert(ckpt: str | Path, output: str | Path | None = None, dtype: str = "keep") -> Path:
    """Convert ``ckpt`` to the safetensors file ``output``; returns its path. Never overwrites."""
    import torch

    from ldm.checkpoint import read_checkpoint
    from ldm.output import interrupts_deferred
    from ldm.run import check_checkpoint_file

    ckpt = Path(ckpt)
    output = Path(output) if output else ckpt.with_suffix(".safetensors")
    if output.suffix.lower() != ".safetensors":
        raise InputError(f"the output {output} must end in .safetensors")
    if output.exists() or output.is_symlink():
        raise OutputError(f"{output} already exists; not overwriting it: remove it or name another output")
    if not output.parent.is_dir():
        raise OutputError(f"output folder {output.parent} does not exist; create it first")
    if ckpt.exists():
        check_checkpoint_file(ckpt, fix="check the path")
    state_dict, _ = read_checkpoint(ckpt)
    dtypes = target_dtypes(state_dict, dtype)
    temp = output.parent / f".{output.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors"
    try:
        try:
            write_safetensors(temp, state_dict, dtypes, {"format": "pt"})
        except OSError as err:
            raise OutputError(f"cannot write {temp}: {err.strerror or err}; free some space or choose another "
                              f"output") from None
        written, _ = read_checkpoint(temp)
        for key, tensor in state_dict.items():
            if not torch.equal(written[key], tensor.to(dtypes[key])):
                raise OutputError(f"{temp} did not read back equal at {key}; nothing was written")
        del written
        with interrupts_deferred():
            try:
                os.link(temp, output)  # atomic, and fails if the name was taken meanwhile
            except FileExistsError:
                raise OutputError(f"{output} already exists; not overwriting it") from None
            except OSError as err:
                if err.errno not in NO_HARD_LINKS:
                    raise OutputError(f"cannot write {output}: {err.strerror or err}") from None
                if output.exists():  # no hard links here (FAT, some shares): check, then rename
                    raise OutputError(f"{output} already exists; not overwriting it") from None
                os.replace(temp, output)
    finally:
        if temp.exists():
            temp.unlink()
    return output


def main(argv: list[str] | None = None) -> None:
    opt = build_parser().parse_args(argv)
    output = convert(opt.ckpt, opt.output, opt.dtype)
    size = output.stat().st_size / 2**20
    print(f"wrote {output} ({size:.1f} MiB{'' if opt.dtype == 'keep' else ', ' + opt.dtype})")


if __name__ == "__main__":
    cli.exit_with(main)
