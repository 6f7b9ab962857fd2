"""What the torch backend's own CPU kernels earn: Winograd convolutions and prepacked oneDNN kernels, each against
the same model without it.

    python scripts/benchmark_kernels.py             # full-size deterministic SD v1 weights, 512x512, fp32
    python scripts/benchmark_kernels.py --quick     # the tiny reference model, 64x64: a smoke test

One process, the model as the pipeline runs it on the CPU (``ldm.inference.residency.PartWeights``), the
variants alternating round by round on the same inputs:

* ``shipped``: as users run it: prepacked kernels, and Winograd for the large float32 3x3 convolutions
  (``ldm.backend.winograd``);
* ``no Winograd``: prepacked kernels, every convolution by oneDNN's direct algorithm;
* ``no prepacking``: neither; every convolution through ``F.conv2d`` (oneDNN re-lays out the kernel at each
  call), the residual sum still in the epilogue where it fits.

UNet step (classifier-free guidance, batch 2) and VAE decode (batch 1); medians of ``--repeats`` rounds, and the
largest difference of each variant's output from the shipped one. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from benchmark_openvino import assets, inputs, load_torch, machine_load  # noqa: E402


@contextlib.contextmanager
def without_winograd():
    """Every convolution by oneDNN (the Winograd tile size is 0 for every shape)."""
    from ldm.backend import winograd

    tile_size = winograd.tile_size
    winograd.tile_size = lambda *args: 0
    try:
        yield
    finally:
        winograd.tile_size = tile_size


@contextlib.contextmanager
def without_prepacking(model: torch.nn.Module):
    """Every convolution as if never prepacked (``F.conv2d``); the packed kernels are put back afterwards."""
    from ldm.modules.ops import Conv2d

    saved = [(conv, conv.compute, conv._packed, conv._on_packed) for conv in model.modules()
             if isinstance(conv, Conv2d)]
    for conv, *_ in saved:
        conv.compute, conv._packed, conv._on_packed = None, None, None
    try:
        yield
    finally:
        for conv, compute, packed, on_packed in saved:
            conv.compute, conv._packed, conv._on_packed = compute, packed, on_packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny reference model at 64x64")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512, 64 with --quick)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ldm-benchmark"))
    args = parser.parse_args()
    args.size = args.size or (64 if args.quick else 512)

    from ldm.backend.layout import preferred_memory_format
    from ldm.backend.memory import tuned_allocator
    from ldm.inference.residency import PartWeights

    config, ckpt = assets(args)
    model = load_torch(config, ckpt, "float32")
    for part in (model.model, model.first_stage_model):
        PartWeights(part, torch.float32, preferred_memory_format("cpu", torch.float32)).use()
    x = inputs(model, args.size)
    networks = {"UNet step, batch 2": lambda: model.apply_model(x["x"], x["t"], x["context"]),
                "VAE decode, batch 1": lambda: model.decode_first_stage(x["z"])}
    variants = {"shipped": contextlib.nullcontext, "no Winograd": without_winograd,
                "no prepacking": lambda: without_prepacking(model)}
    times = {(n, v): [] for n in networks for v in variants}
    outputs: dict = {}
    before = machine_load()
    with tuned_allocator(), torch.no_grad():
        for variant, context in variants.items():  # first calls: kernels packed, outputs kept
            with context():
                for name, fn in networks.items():
                    outputs[name, variant] = fn().float()
        for _ in range(args.repeats):
            for variant, context in variants.items():
                with context():
                    for name, fn in networks.items():
                        start = time.perf_counter()
                        fn()
                        times[name, variant].append(time.perf_counter() - start)
    after = machine_load()

    print(f"{args.size}x{args.size}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads; medians of "
          f"{args.repeats} alternating rounds; load average {' '.join(before['loadavg'])} before, "
          f"{' '.join(after['loadavg'])} after\n")
    print("| network | " + " | ".join(variants) + " | " + " | ".join(f"{v} / shipped" for v in variants
                                                             if v != "shipped") + " |")
    print("|---|" + "---:|" * (2 * len(variants) - 1))
    for name in networks:
        medians = {v: statistics.median(times[name, v]) for v in variants}
        cells = [f"{medians[v]:.2f} s" for v in variants]
        ratios = [f"{medians[v] / medians['shipped']:.2f}" for v in variants if v != "shipped"]
        print(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    for name in networks:
        ref = outputs[name, "shipped"]
        diffs = ", ".join(f"{v} {float((outputs[name, v] - ref).abs().max()):.1e}" for v in variants
                          if v != "shipped")
        print(f"- {name}: largest difference from shipped ({diffs}; output std {float(ref.std()):.2f})")


if __name__ == "__main__":
    main()
