"""What the command-line scripts share: the flags added to the original ones, and the error handling around
``main`` (expected errors and interrupts become one line on stderr and an exit code, never a traceback)."""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from typing import Callable, NoReturn, Sequence

from ldm.errors import InputError, LdmError, ModelNotFoundError, Terminated, first_line

TRACEBACK_ENV = "LDM_TRACEBACK"
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM; SIGHUP (the terminal closed) ends a run the same way, with 128 + SIGHUP
# where the original's README downloads the LAION-400M text-to-image checkpoint
LAION400M_CKPT_URL = "https://ommer-lab.com/files/latent-diffusion/nitro/txt2img-f8-large/model.ckpt"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ... (see --help)``) instead of usage plus error."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def device_name(value: str) -> str:
    """argparse type for ``--device``: auto, cpu, mps, cuda or cuda:N."""
    value = value.strip().lower()
    if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"invalid device '{value}' (choose from auto, cpu, cuda, cuda:N, mps)")


def add_new_flags(parser: argparse.ArgumentParser) -> None:
    """The flags both scripts have beyond the original's."""
    parser.add_argument("--negative_prompt", type=str, default="",
                        help="text to steer away from: used as the unconditional prompt instead of \"\"")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto|cpu|cuda|mps (auto: cuda, then mps, then cpu)")
    parser.add_argument("--safety_checker", type=str, default="auto",
                        help="auto (use CompVis/stable-diffusion-safety-checker if found locally in "
                             "models/safety-checker/ or the Hugging Face cache), off, or the path of its folder")
    parser.add_argument("--no_watermark", action="store_true",
                        help="do not embed the invisible watermark \"StableDiffusionV1\"")
    parser.add_argument("--per_image", action="store_true",
                        help="compute the images of a batch one at a time (slower), so that each is bit for bit the "
                             "image its seed makes alone; by default a batch runs at once, and an image made alone "
                             "differs from it by rounding only")
    parser.add_argument("--backend", choices=["auto", "torch", "openvino"], default="auto",
                        help="what runs the networks: torch, or OpenVINO on the CPU (converted from the checkpoint "
                             "once, cached in ~/.cache/ldm/openvino); auto: OpenVINO for SD-sized models on a CPU "
                             "with AVX-512 where it is installed and memory allows, else torch (docs/benchmark.md)")


def add_precision_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", type=str, help="evaluate at this precision (autocast: fp16 on CUDA, bf16 on "
                        "a CPU with native bf16, else full)", choices=["full", "autocast", "bf16", "fp16"],
                        default="autocast")


def _on_terminate(signum: int, frame) -> None:
    raise Terminated(signum)


_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def main(body: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None,
         prog: str | None = None) -> int:
    """Run ``body(argv)``; expected errors, Ctrl-C, SIGTERM and SIGHUP become one line on stderr and an exit code."""
    prog = prog or os.path.basename(sys.argv[0])
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _on_terminate) for sig in _TERMINATING}
    try:
        body(argv)
        return 0
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; the images saved so far are complete", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as stop:
        print(f"{prog}: terminated; the images saved so far are complete", file=sys.stderr)
        return 128 + int(stop.signum)
    except LdmError as err:
        print(f"{prog}: error: {first_line(err)}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        return 1
    except MemoryError:
        print(f"{prog}: error: out of memory; try a smaller --H/--W or --n_samples", file=sys.stderr)
        return 1
    except Exception as err:
        if os.environ.get(TRACEBACK_ENV):  # a bug or an unforeseen environment problem: still one line, unless asked
            raise
        torch_oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", ())  # only where torch was imported
        if isinstance(err, torch_oom):
            print(f"{prog}: error: out of device memory; try a smaller --H/--W or --n_samples, or --precision "
                  f"fp16", file=sys.stderr)
        elif "can't allocate memory" in str(err):  # torch's CPU allocator raises a bare RuntimeError: no type says it
            size = re.search(r"allocate (\d+) bytes", str(err))
            detail = f" (an allocation of {int(size.group(1)) / 2**30:.1f} GiB failed)" if size else ""
            print(f"{prog}: error: out of memory{detail}; try a smaller --H/--W or --n_samples", file=sys.stderr)
        else:
            print(f"{prog}: error: {type(err).__name__}: {first_line(err)} (set {TRACEBACK_ENV}=1 for the "
                  f"traceback)", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_with(body: Callable[[Sequence[str] | None], object]) -> NoReturn:
    """``sys.exit(main(body))`` for a script's ``if __name__ == "__main__"``."""
    sys.exit(main(body))


def sampler_name(plms: bool, dpm_solver: bool) -> str:
    """The sampler chosen by ``--plms`` / ``--dpm_solver`` (DDIM when neither)."""
    if plms and dpm_solver:
        raise InputError("--plms and --dpm_solver exclude each other; choose one sampler")
    return "plms" if plms else "dpm_solver" if dpm_solver else "ddim"


def use_laion400m(opt: argparse.Namespace, parser: argparse.ArgumentParser, **paths: str) -> None:
    """``--laion400m``: switch config, ckpt and outdir (those left at their defaults) to the LAION-400M model's,
    and fail naming the paths when that model is not here."""
    for name, path in paths.items():
        if getattr(opt, name) == parser.get_default(name):
            setattr(opt, name, path)
    missing = [path for path in (opt.config, opt.ckpt) if not os.path.exists(path)]
    if missing:
        fixes = [f"download the checkpoint from {LAION400M_CKPT_URL} to {opt.ckpt}"] if opt.ckpt in missing else []
        fixes += ["run from the project folder, which has the config"] if opt.config in missing else []
        raise ModelNotFoundError(f"--laion400m needs the LAION-400M model: config {opt.config} and checkpoint "
                                 f"{opt.ckpt}; missing: {', '.join(missing)} ({', '.join(fixes)}, or pass "
                                 f"--config/--ckpt)")
