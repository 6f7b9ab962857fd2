"""Images per second for ``--n_samples`` 1, 2 and 4, batched (one UNet call per step) and one image at a time
(``--per_image``), and how far a batched image is from the same image made alone.

    python scripts/benchmark_batch.py --ckpt /tmp/ldm-benchmark/sd-v1-det.ckpt      # 512x512, fp32 and bf16

The checkpoint is a full-size SD v1 one (``scripts/benchmark.py`` writes deterministic weights to its workdir).
Each configuration runs ``Pipeline.generate`` as the scripts do (text encoder, sampling, decode) at two step
counts; the difference gives the cost of a step and the rest the fixed cost, from which the time of a
``--steps`` run (default 50, the scripts' default) follows: ``images/s = n / (fixed + steps * per_step)``.
Prints a Markdown table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/stable-diffusion/v1-inference.yaml")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="the run length the figures are given for")
    parser.add_argument("--measure", default="1,2", help="the two step counts actually run, per precision")
    parser.add_argument("--bf16-measure", default="1,2")
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--precisions", default="full,bf16")
    args = parser.parse_args()

    import numpy as np
    import torch

    from ldm.backend.memory import release_library_pages, tuned_allocator
    from ldm.inference.pipeline import Settings, load_pipeline

    batches = [int(b) for b in args.batches.split(",")]
    prompt = "a photograph of an astronaut riding a horse"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    rows = []
    with tuned_allocator():
        for precision in args.precisions.split(","):
            pipe = load_pipeline(args.config, args.ckpt, device="cpu", precision=precision, say=lambda m: None)
            release_library_pages()
            low, high = (int(s) for s in (args.bf16_measure if precision == "bf16" else args.measure).split(","))
            pipe.generate([prompt], [0], Settings(steps=1, height=args.size, width=args.size))  # warm-up: file pages,
            # first-call allocations and kernel choices are not what a step costs
            for n in batches:
                seeds = list(range(100, 100 + n))
                timings, images = {}, {}
                for per_image in (False, True):
                    for steps in (low, high):
                        settings = Settings(steps=steps, height=args.size, width=args.size)
                        start = time.perf_counter()
                        out, _ = pipe.generate(n * [prompt], seeds, settings, per_image=per_image)
                        timings[(per_image, steps)] = time.perf_counter() - start
                        images[(per_image, steps)] = out
                        print(f"{precision} n={n} per_image={per_image} steps={steps}: "
                              f"{timings[(per_image, steps)]:.1f} s", flush=True)
                row = {"precision": pipe.precision.label, "n": n}
                for per_image in (False, True):
                    per_step = (timings[(per_image, high)] - timings[(per_image, low)]) / (high - low)
                    fixed = timings[(per_image, low)] - low * per_step
                    row["per_image" if per_image else "batched"] = n / (fixed + args.steps * per_step)
                # the same images, batched and alone (per_image computes each as if it were alone)
                row["max_diff"] = int(np.abs(images[(False, high)].astype(int)
                                             - images[(True, high)].astype(int)).max())
                rows.append(row)
            pipe = None
    print("\n| precision | --n_samples | batched, images/s | one at a time, images/s | batched / one at a time "
          "| largest pixel difference, batched vs alone |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['precision']} | {r['n']} | {r['batched']:.4f} | {r['per_image']:.4f} | "
              f"{r['batched'] / r['per_image']:.2f} | {r['max_diff']} |")


if __name__ == "__main__":
    main()
