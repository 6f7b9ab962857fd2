"""Peak memory and time of loading a full-size SD v1 checkpoint, each measured in a fresh process.

    python scripts/benchmark_load.py                       # builds a deterministic 4.27 GB checkpoint first
    python scripts/benchmark_load.py --ckpt models/ldm/stable-diffusion-v1/model.ckpt

Each run loads the checkpoint with ``ldm.loading.build.load_model_from_config``, then reads every weight once
(so memory-mapped pages are really resident) and reports the process's peak RSS as a multiple of the file
size. Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time, torch
from omegaconf import OmegaConf
from ldm.loading.build import load_model_from_config
config, ckpt, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
start = time.perf_counter()
model = load_model_from_config(OmegaConf.load(config), ckpt, dtype=getattr(torch, dtype))
loaded = time.perf_counter() - start
def peak_rss():  # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's at fork)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
rss_loaded = peak_rss()
with torch.no_grad():
    total = sum(float(p.float().sum()) if p.numel() < 2**24 else float(p.sum()) for p in model.parameters())
print(json.dumps({"load_s": loaded, "rss_after_load": rss_loaded,
                  "rss_peak": peak_rss()}))
"""


def measure(config: str, ckpt: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, config, str(ckpt), dtype], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint to load (default: build one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpts = {}
        if args.ckpt is not None:
            ckpts["given"] = args.ckpt
        else:
            from omegaconf import OmegaConf

            from ldm.testing.deterministic_weights import write_deterministic_checkpoint

            for name, dtype in (("fp32 .ckpt", "float32"), ("bf16 .safetensors", "bfloat16")):
                import torch

                suffix = ".ckpt" if dtype == "float32" else ".safetensors"
                path = Path(tmp) / f"sd-v1-{dtype}{suffix}"
                write_deterministic_checkpoint(OmegaConf.load(args.config), path, dtype=getattr(torch, dtype))
                ckpts[name] = path
        rows = []
        for name, path in ckpts.items():
            size = os.path.getsize(path)
            for dtype in ("float32", "bfloat16"):
                result = measure(args.config, path, dtype)
                rows.append((name, size, dtype, result))

    print(f"{'checkpoint':<20} {'size GB':>8} {'weights':>9} {'load s':>7} {'peak RSS GB':>12} {'x size':>7}")
    for name, size, dtype, r in rows:
        print(f"{name:<20} {size / 1e9:>8.2f} {dtype:>9} {r['load_s']:>7.1f} {r['rss_peak'] / 1e9:>12.2f} "
              f"{r['rss_peak'] / size:>7.2f}")
    print(f"(machine: {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()
