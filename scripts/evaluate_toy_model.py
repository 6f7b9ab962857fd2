"""Judge a toy-shapes model the way a user runs it: scripts/txt2img.py on every caption, judged by pixels.

    python scripts/evaluate_toy_model.py                                   # the shipped model, defaults
    python scripts/evaluate_toy_model.py --ckpt cand/model.ckpt --scale 7.5 5 --precision full bf16

For each sampler (DDIM, PLMS and DPM-Solver at the script's 50 steps, DPM-Solver at 20), scale and precision,
txt2img makes ``--seeds`` images of each of the 24 captions (seeds from 1000; training draws no seeds), and
tests/toy_classifier.py judges colour, shape, background, circle roundness (fill of the bounding box, 0.74-0.83
for a true circle) and blotches. Prints one line per run and the totals; ``--json`` saves them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldm.data.toy_shapes import CAPTIONS, CLASSES  # noqa: E402
from tests.toy_classifier import CIRCLE_FILL, inspect  # noqa: E402

# flags and steps: None keeps the script's default (50 steps for every sampler); DPM-Solver is often run with 20
SAMPLERS = {"ddim": ([], None), "plms": (["--plms"], None), "dpm_solver": (["--dpm_solver"], None),
            "dpm_solver_20": (["--dpm_solver"], 20)}


class GenerationFailed(RuntimeError):
    """scripts/txt2img.py exited with an error (the message is its last stderr line)."""


def generate(ckpt: Path, config: Path, sampler: str, outdir: Path, seeds: int = 3, scale: float | None = None,
             precision: str = "full", env: dict | None = None, timeout: float | None = None) -> list[np.ndarray]:
    """``seeds`` images of each caption (seeds from 1000) by scripts/txt2img.py with ``sampler``, in prompt
    order, seed after seed. ``scale`` None: the script's default; ``env``: the script's environment."""
    flag, steps = SAMPLERS[sampler]
    prompts = outdir / "prompts.txt"
    outdir.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(CAPTIONS) + "\n")
    cmd = [sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--config", str(config), "--ckpt", str(ckpt),
           "--from-file", str(prompts), "--n_samples", str(len(CAPTIONS)), "--n_iter", str(seeds),
           "--H", "64", "--W", "64", "--seed", "1000", "--precision", precision, "--skip_grid",
           "--outdir", str(outdir), *flag]
    cmd += [] if steps is None else ["--ddim_steps", str(steps)]
    cmd += [] if scale is None else ["--scale", str(scale)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise GenerationFailed((result.stderr.strip().splitlines() or ["no message"])[-1])
    files = sorted((outdir / "samples").glob("*.png"))
    if len(files) != len(CAPTIONS) * seeds:
        raise GenerationFailed(f"{len(files)} samples written, {len(CAPTIONS) * seeds} expected")
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def judge(images: list[np.ndarray]) -> dict:
    counts = {"colour": 0, "shape": 0, "background": 0, "circles": 0, "round": 0, "blotched": 0}
    misses = []
    for i, image in enumerate(images):
        expected = CLASSES[i % len(CLASSES)]  # files follow the prompt order, seed after seed
        report = inspect(image)
        got = tuple(report.verdict)
        counts["colour"] += got[0] == expected[0]
        counts["shape"] += got[1] == expected[1]
        counts["background"] += got[2] == expected[2]
        counts["blotched"] += int(report.blotch > 0)
        if expected[1] == "circle" and got[1] == "circle":
            counts["circles"] += 1
            counts["round"] += int(CIRCLE_FILL[0] <= report.fill <= CIRCLE_FILL[1])
        if got != expected:
            misses.append(f"{CAPTIONS[i % len(CAPTIONS)]} -> {got}")
    counts["images"] = len(images)
    counts["misses"] = misses
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, default=ROOT / "models/ldm/toy-shapes/model.ckpt")
    parser.add_argument("--config", type=Path, help="default: config.yaml beside --ckpt")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--scale", nargs="+", type=float, default=[7.5])
    parser.add_argument("--precision", nargs="+", default=["full"], choices=["full", "bf16"])
    parser.add_argument("--seeds", type=int, default=3, help="images per caption")
    parser.add_argument("--json", type=Path, help="write the counts here")
    opt = parser.parse_args(argv)
    config = opt.config or opt.ckpt.parent / "config.yaml"
    results, totals = [], {}
    for precision in opt.precision:
        for scale in opt.scale:
            for sampler in opt.samplers:
                start = time.time()
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        images = generate(opt.ckpt, config, sampler, Path(tmp), opt.seeds, scale, precision)
                    except GenerationFailed as err:
                        raise SystemExit(f"evaluate_toy_model.py: txt2img failed: {err}") from None
                counts = judge(images)
                n = counts["images"]
                print(f"{precision:4} scale {scale:<4} {sampler:10} colour {counts['colour']}/{n} "
                      f"shape {counts['shape']}/{n} background {counts['background']}/{n} "
                      f"round {counts['round']}/{counts['circles']} blotched {counts['blotched']} "
                      f"({time.time() - start:.0f} s)", flush=True)
                results.append({"precision": precision, "scale": scale, "sampler": sampler, **counts})
                for key in ("images", "colour", "shape", "background", "circles", "round", "blotched"):
                    totals[key] = totals.get(key, 0) + counts[key]
    n = totals["images"]
    print(f"total: colour {100 * totals['colour'] / n:.1f} %, shape {100 * totals['shape'] / n:.1f} %, "
          f"background {100 * totals['background'] / n:.1f} %, round circles "
          f"{totals['round']}/{totals['circles']}, blotched {totals['blotched']}/{n}")
    if opt.json:
        opt.json.write_text(json.dumps({"runs": results, "totals": totals}, indent=1))


if __name__ == "__main__":
    main()
