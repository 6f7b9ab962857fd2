"""The OpenVINO backend against our torch backend on the CPU: step timings, conversion, cached load, memory.

    python scripts/benchmark_openvino.py             # full-size deterministic SD v1 weights, 512x512 (~20 min)
    python scripts/benchmark_openvino.py --quick     # the tiny reference model, 64x64: a smoke test of every part

Each part runs in fresh processes (so a peak RSS is that part's own), with the same calls: the text encoder on one
prompt, one classifier-free-guidance UNet step (batch 2), one VAE decode and one encode (batch 1).

* ``convert``: OpenVINO with an empty cache: each network converted, compiled and run, then run again; the first
  call minus the second is what converting and compiling cost.
* ``load``: the same in a new process with the cache filled: first call minus second = cached load.
* ``torch``: our torch backend as the pipeline runs it (loaded as stored, the part in use, ``precision full``).
* ``steps``: one process, torch and OpenVINO (from the cache) alternating, ``--repeats`` rounds: UNet step and
  VAE decode; medians.

The machine is shared: its load average and busy processes are recorded before and after each part. Nothing is
asserted. Prints a Markdown summary; writes JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark import peak_rss  # noqa: E402  (scripts/benchmark.py)

FULL_CONFIG = ROOT / "configs/stable-diffusion/v1-inference.yaml"
PROMPT = "a photograph of an astronaut riding a horse"
GB = 1e9


# ------------------------------------------------------------------------------------------------ machine
def machine_load() -> dict:
    """Load average and the other CPU-heavy processes (this machine is shared)."""
    ps = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    others = [" ".join(line.split()[1:])[:90] for line in ps.splitlines()[1:8]
              if float(line.split()[0]) > 20 and "benchmark_openvino" not in line]
    return {"loadavg": open("/proc/loadavg").read().split()[:3], "busy": others}


def machine() -> dict:
    import openvino
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "openvino": openvino.get_version(), "avx512f": " avx512f" in flags,
            "avx512_bf16": " avx512_bf16" in flags, "amx": " amx_bf16" in flags,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ------------------------------------------------------------------------------------------------ model and inputs
def assets(args) -> tuple[Path, Path]:
    """(config, checkpoint): the full-size deterministic weights (``scripts/benchmark.py``'s file), or the tiny
    reference model with --quick; written where missing."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.quick:
        import torch

        from tests.conftest import tiny_config, tiny_state_dict

        config, ckpt = args.workdir / "v1-tiny.yaml", args.workdir / "tiny.ckpt"
        if not ckpt.exists():
            from omegaconf import OmegaConf

            OmegaConf.save(tiny_config(), config)
            torch.save({"state_dict": tiny_state_dict()}, ckpt)
        return config, ckpt
    ckpt = args.workdir / "sd-v1-det.ckpt"
    if not ckpt.exists():
        from omegaconf import OmegaConf

        from ldm.testing.deterministic_weights import write_deterministic_checkpoint

        print(f"writing {ckpt} (deterministic weights, fp32)", flush=True)
        write_deterministic_checkpoint(OmegaConf.load(FULL_CONFIG), ckpt)
    return FULL_CONFIG, ckpt


def inputs(model, size: int) -> dict:
    """The benchmark's inputs: a CFG batch for the UNet, one latent, one image."""
    import torch

    gen = torch.Generator().manual_seed(0)
    latent = size // 8
    width = model.cond_stage_model.transformer.config.hidden_size  # the CLIP context's width
    return {"x": torch.randn(2, 4, latent, latent, generator=gen), "t": torch.tensor([500, 500]),
            "context": torch.randn(2, 77, width, generator=gen), "z": torch.randn(1, 4, latent, latent, generator=gen),
            "image": torch.rand(1, 3, size, size, generator=gen) * 2 - 1}


def load_torch(config: Path, ckpt: Path, dtype_name: str):
    """Our model as the pipeline holds it on the CPU: loaded as stored (memory-mapped)."""
    import torch
    from omegaconf import OmegaConf

    from ldm.loading.build import load_model_from_config

    return load_model_from_config(OmegaConf.load(config), ckpt, dtype=getattr(torch, dtype_name), as_stored=True,
                                  verbose=False)


def calls(model, x: dict) -> dict:
    """name -> a zero-argument call of that network on ``model`` (torch or OpenVINO)."""
    return {"text_encoder": lambda: model.get_learned_conditioning([PROMPT]),
            "unet": lambda: model.apply_model(x["x"], x["t"], x["context"]),
            "decoder": lambda: model.decode_first_stage(x["z"]),
            "encoder": lambda: model.encode_first_stage(x["image"]).mean}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ children
def child_openvino(args, config: Path, ckpt: Path) -> dict:
    """First and second call of each network through OpenVINO (``--cache``), with peak RSS after each."""
    import torch

    from ldm.backend.memory import release_file_pages
    from ldm.inference.openvino import OpenVINOModel

    start = time.perf_counter()
    model = load_torch(config, ckpt, "float32")
    loaded = time.perf_counter() - start
    ov_model = OpenVINOModel(model, precision=args.precision, cache_dir=args.cache, release_weights=release_file_pages,
                             say=lambda message: print(message, file=sys.stderr))
    x = inputs(model, args.size)
    result = {"torch_load": loaded, "parts": {}}
    with torch.no_grad():
        for name, call in calls(ov_model, x).items():
            first, second = timed(call), timed(call)
            result["parts"][name] = {"first": first, "second": second, "rss": peak_rss()}
    result["conversions"] = {p.name: p.conversions for p in ov_model.parts}
    result["code"] = {p.name: p.code[:16] for p in ov_model.parts}  # part of the cache key: the source it runs
    result["wall"] = time.perf_counter() - start
    return result


def child_torch(args, config: Path, ckpt: Path) -> dict:
    """The same calls on our torch backend, each part in use while it runs (as the pipeline does)."""
    import torch

    from ldm.backend.layout import preferred_memory_format
    from ldm.backend.memory import tuned_allocator
    from ldm.inference.residency import PartWeights

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    start = time.perf_counter()
    model = load_torch(config, ckpt, str(dtype).removeprefix("torch."))
    result = {"torch_load": time.perf_counter() - start, "parts": {}}
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs(model, args.size).items()}
    owner = {"text_encoder": model.cond_stage_model, "unet": model.model, "decoder": model.first_stage_model,
             "encoder": model.first_stage_model}
    with tuned_allocator(), torch.no_grad():
        for name, call in calls(model, x).items():
            part = PartWeights(owner[name], dtype, preferred_memory_format("cpu", dtype))
            part.use()
            first, second = timed(call), timed(call)
            part.set_aside()
            result["parts"][name] = {"first": first, "second": second, "rss": peak_rss()}
    result["wall"] = time.perf_counter() - start
    return result


def child_steps(args, config: Path, ckpt: Path) -> dict:
    """UNet step and VAE decode, torch and OpenVINO alternating in one process (OpenVINO from the cache)."""
    import torch

    from ldm.backend.layout import preferred_memory_format
    from ldm.backend.memory import tuned_allocator
    from ldm.inference.openvino import OpenVINOModel
    from ldm.inference.residency import PartWeights

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    ours = load_torch(config, ckpt, str(dtype).removeprefix("torch."))
    for part in (ours.model, ours.first_stage_model):
        PartWeights(part, dtype, preferred_memory_format("cpu", dtype)).use()
    source = ours if dtype == torch.float32 else load_torch(config, ckpt, "float32")  # the cache's key: fp32 weights
    ov_model = OpenVINOModel(source, precision=args.precision, cache_dir=args.cache)
    x = inputs(ours, args.size)
    xt = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
    fns = {"unet torch": lambda: ours.apply_model(xt["x"], xt["t"], xt["context"]),
           "unet openvino": lambda: ov_model.apply_model(x["x"], x["t"], x["context"]),
           "decode torch": lambda: ours.decode_first_stage(xt["z"]),
           "decode openvino": lambda: ov_model.decode_first_stage(x["z"])}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with tuned_allocator(), torch.no_grad():
        for fn in fns.values():  # warm-up: OpenVINO compiles from its cache, torch packs its kernels
            fn()
        for _ in range(args.repeats):
            for name, fn in fns.items():
                times[name].append(timed(fn))
        eps_torch, eps_ov = fns["unet torch"]().float(), fns["unet openvino"]()
    return {"times": times, "unet_max_abs_diff": float((eps_torch - eps_ov).abs().max()),
            "unet_std": float(eps_torch.std()),
            "conversions": {p.name: p.conversions for p in ov_model.parts}}


CHILDREN = {"openvino": child_openvino, "torch": child_torch, "steps": child_steps}


def run_child(args, name: str) -> dict:
    command = [sys.executable, __file__, "--child", name, "--workdir", str(args.workdir), "--cache", str(args.cache),
               "--size", str(args.size), "--repeats", str(args.repeats), "--precision", args.precision]
    if args.quick:
        command.append("--quick")
    before = machine_load()
    start = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {name} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update({"process_wall": time.perf_counter() - start, "load_before": before, "load_after": machine_load(),
                   "notices": [line for line in out.stderr.splitlines() if "notice" in line or "converting" in line]})
    print(f"  {name}: {result['process_wall']:.0f} s, load {before['loadavg']} -> {result['load_after']['loadavg']}",
          flush=True)
    return result


# ------------------------------------------------------------------------------------------------ report
def cache_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def report(results: dict) -> str:
    m = results["machine"]
    med = statistics.median
    lines = [f"OpenVINO backend vs torch backend, {results['model']}, {results['size']}x{results['size']}, "
             f"{results['precision']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads), OpenVINO "
             f"{m['openvino']}, {m['date']}.", ""]
    steps = results.get("steps")
    if steps:
        t = steps["times"]
        lines += [f"In one process, alternating, medians of {len(t['unet torch'])} rounds:", "",
                  "| measure | torch | OpenVINO | OpenVINO / torch |", "|---|---:|---:|---:|"]
        for label, key in (("UNet CFG step, batch 2", "unet"), ("VAE decode, batch 1", "decode")):
            a, b = med(t[f"{key} torch"]), med(t[f"{key} openvino"])
            lines.append(f"| {label} | {a:.2f} s | {b:.2f} s | **{b / a:.2f}** |")
        lines += ["", "All rounds (s): " + "; ".join(f"{k} {[round(v, 2) for v in vs]}" for k, vs in t.items()),
                  f"UNet eps, OpenVINO vs torch: max abs diff {steps['unet_max_abs_diff']:.2e} "
                  f"(std {steps['unet_std']:.3f})", ""]
    rows = [("convert", "OpenVINO, empty cache: convert + compile + run"),
            ("load", "OpenVINO, cache filled: load + compile from cache + run"), ("torch", "torch backend")]
    lines += ["Fresh processes, first call of each network (then the second call):", "",
              "| process | " + " | ".join(results["parts"]) + " | peak RSS | process wall |",
              "|---|" + "---:|" * (len(results["parts"]) + 2)]
    for key, label in rows:
        r = results.get(key)
        if r:
            cells = [f"{r['parts'][p]['first']:.1f} s ({r['parts'][p]['second']:.1f} s)" for p in results["parts"]]
            peak = max(v["rss"] for v in r["parts"].values())
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {peak / GB:.2f} GB | {r['process_wall']:.0f} s |")
    load, convert = results.get("load"), results.get("convert")
    if load and any(load["conversions"].values()):
        changed = [p for p in load["conversions"] if convert and load.get("code", {}).get(p) != convert.get("code",
                   {}).get(p)]
        lines += ["", "**The cache-filled process converted again**: " + ", ".join(
            p for p, n in load["conversions"].items() if n) + (
            f" (the source of {', '.join(changed)} changed between the two processes: an edit during the run)"
            if changed else " (same source: see its notices)")]
    lines += ["", f"Cache on disk: {results['cache_bytes'] / GB:.2f} GB. Machine load per part: " + "; ".join(
        f"{k} {results[k]['load_before']['loadavg']} -> {results[k]['load_after']['loadavg']} "
        f"(busy: {len(results[k]['load_after']['busy'])})" for k in ("convert", "load", "torch", "steps")
        if k in results)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny reference model at 64x64")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512, 64 with --quick)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds of the in-process steps")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--parts", default="convert,load,torch,steps")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ldm-benchmark")
    parser.add_argument("--cache", type=Path, default=None, help="OpenVINO cache (default: a fresh one in workdir)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: workdir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (64 if args.quick else 512)
    args.cache = args.cache or args.workdir / ("openvino-cache-quick" if args.quick else "openvino-cache")
    config, ckpt = assets(args)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args, config, ckpt)))
        return
    parts = args.parts.split(",")
    results = {"machine": machine(), "model": "tiny reference model" if args.quick else "full-size SD v1 "
               "(deterministic weights)", "size": args.size, "precision": args.precision,
               "parts": ["text_encoder", "unet", "decoder", "encoder"]}
    if "convert" in parts:
        shutil.rmtree(args.cache, ignore_errors=True)
        results["convert"] = run_child(args, "openvino")
    if "load" in parts:
        results["load"] = run_child(args, "openvino")
    if "torch" in parts:
        results["torch"] = run_child(args, "torch")
    if "steps" in parts:
        results["steps"] = run_child(args, "steps")
    results["cache_bytes"] = cache_bytes(args.cache) if args.cache.exists() else 0
    text = report(results)
    print(text)
    out = args.out or args.workdir / f"benchmark-openvino-{'quick' if args.quick else 'full'}-{args.precision}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
