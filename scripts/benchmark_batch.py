"""Images per second for ``--n_samples`` 1, 2 and 4: batched (one UNet call per step for the whole batch) and one
image at a time (``--per_image``), on the CPU.

    python scripts/benchmark_batch.py --ckpt /tmp/ldm-benchmark/sd-v1-det.ckpt      # 512x512, fp32 and bf16

The checkpoint is a full-size SD v1 one (``scripts/benchmark.py`` writes deterministic weights to its workdir).
A run's time is its text encoding, its UNet steps and its decode, so each is timed as the pipeline runs it, batched
against one image at a time, alternating, medians of ``--rounds`` rounds: the prompts' conditioning, one
classifier-free-guidance UNet step (batch 2n at once, or n calls of batch 2) and the decode. A ``--steps`` run
(default 50, the scripts' default) then makes ``n / (encode + steps * step + decode)`` images per second.
Prints a Markdown table and the machine's load; nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a photograph of an astronaut riding a horse"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(pipe, n: int, size: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median seconds of each part for ``n`` images, batched and one at a time."""
    import torch

    model, latent = pipe.model, size // 8
    x = torch.randn(2 * n, 4, latent, latent, device=pipe.device)
    t = torch.full((2 * n,), 500, device=pipe.device, dtype=torch.long)
    z = torch.randn(n, 4, latent, latent, device=pipe.device)
    with torch.no_grad(), pipe.precision.context(pipe.device):
        c, uc = pipe.conditioning([PROMPT] * n, "", 7.5)
        context = torch.cat([uc, c])
        parts = {
            "encode": (lambda: pipe.conditioning([PROMPT] * n, "", 7.5),
                       lambda: [pipe.conditioning([PROMPT], "", 7.5) for _ in range(n)]),
            "step": (lambda: model.apply_model(x, t, context),
                     lambda: [model.apply_model(x[i::n], t[i::n], context[i::n]) for i in range(n)]),
            "decode": (lambda: pipe.decode(z), lambda: [pipe.decode(z[i:i + 1]) for i in range(n)]),
        }
        times: dict[str, dict[str, list[float]]] = {p: {"batched": [], "per_image": []} for p in parts}
        for name, (batched, per_image) in parts.items():
            pipe.use({"encode": model.cond_stage_model, "step": model.model,
                      "decode": model.first_stage_model}[name])
            batched()  # warm-up: weights converted, first-call allocations
            for _ in range(rounds):
                times[name]["batched"].append(timed(batched))
                times[name]["per_image"].append(timed(per_image))
    return {p: {mode: statistics.median(v) for mode, v in modes.items()} for p, modes in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/stable-diffusion/v1-inference.yaml")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="the run length the figures are given for")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--precisions", default="full,bf16")
    args = parser.parse_args()

    import torch

    from ldm.backend.memory import release_library_pages, tuned_allocator
    from ldm.inference.pipeline import load_pipeline

    batches = [int(b) for b in args.batches.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average before {os.getloadavg()}", flush=True)
    rows = []
    with tuned_allocator():
        for precision in args.precisions.split(","):
            pipe = load_pipeline(args.config, args.ckpt, device="cpu", precision=precision, say=lambda m: None)
            release_library_pages()
            for n in batches:
                parts = measure(pipe, n, args.size, args.rounds)
                print(f"{pipe.precision.label} n={n}: " + ", ".join(
                    f"{p} {v['batched']:.2f} / {v['per_image']:.2f} s" for p, v in parts.items()), flush=True)
                row = {"precision": pipe.precision.label, "n": n}
                for mode in ("batched", "per_image"):
                    total = parts["encode"][mode] + args.steps * parts["step"][mode] + parts["decode"][mode]
                    row[mode] = n / total
                    row[f"{mode}_step"] = parts["step"][mode]
                rows.append(row)
            pipe = None
    print(f"\nload average after {os.getloadavg()}")
    print(f"\n| precision | --n_samples | UNet step, batched | one at a time | images/s at {args.steps} steps, batched "
          f"| one at a time | batched / one at a time |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['precision']} | {r['n']} | {r['batched_step']:.2f} s | {r['per_image_step']:.2f} s | "
              f"{r['batched']:.5f} | {r['per_image']:.5f} | {r['batched'] / r['per_image']:.2f} |")


if __name__ == "__main__":
    main()
