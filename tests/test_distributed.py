"""Sharded generation under torchrun (issue 7), on CPU with gloo and the tiny reference model.

Real torchrun runs of 2 processes start together as subprocesses (each process pays ~5 s of imports): txt2img on
one "machine", img2img on two simulated machines (two torchrun agents meeting at a c10d rendezvous on localhost),
a run whose rank 1 fails, a run with a bad flag, and a Ctrl-C. Their images are compared pixel for pixel with
single-process runs of the same flags made in this process meanwhile, on one thread as torchrun's processes
(an image's pixels depend on the thread count). DDP training on 2 CPU processes is tested in
tests/test_training.py (``test_ddp_two_cpu_processes``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.app import cli, distributed
from ldm.app.output import TEMP_PREFIX, parse_parameters
from ldm.app.run import plan_jobs, shard_jobs
from ldm.errors import DeviceError, InputError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square", "a green triangle"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


# ---------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("total", [0, 1, 2, 5, 6, 7, 100])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_shares_are_disjoint_complete_and_balanced(total, size):
    shares = [distributed.share(total, distributed.World(rank, size)) for rank in range(size)]
    assert [i for part in shares for i in part] == list(range(total))  # in order, each image once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    if total:
        assert 0 in shares[0]  # rank 0 writes the grid, with image 0's parameters


@pytest.mark.parametrize("fixed_code", [False, True])
def test_sharded_jobs_are_the_single_process_images(fixed_code):
    jobs = plan_jobs(PROMPTS + ["a yellow star"], batch_size=3, n_iter=3, seed=40, fixed_code=fixed_code)
    single = [(job.index, job.first + j, p, s) for job in jobs for j, (p, s) in enumerate(zip(job.prompts, job.seeds))]
    assert [k for _, k, _, _ in single] == list(range(12))
    for size in (1, 2, 5, 12, 13):
        parts = [shard_jobs(jobs, distributed.share(12, distributed.World(r, size))) for r in range(size)]
        sharded = [(job.index, job.first + j, p, s) for part in parts for job in part
                   for j, (p, s) in enumerate(zip(job.prompts, job.seeds))]
        assert sharded == single
        assert all(len(job.prompts) <= 3 for part in parts for job in part)  # batches never grow


def test_world_from_the_environment():
    assert distributed.detect({}) == distributed.World(0, 1, 0)
    assert distributed.detect({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == distributed.World(3, 4, 1)
    assert distributed.detect({"WORLD_SIZE": "2", "RANK": "1"}) == distributed.World(1, 2, 1)
    assert distributed.detect({"WORLD_SIZE": "1"}) == distributed.World()  # e.g. torchrun --nproc_per_node 1
    with pytest.raises(InputError, match=r"variable RANK is not set \(WORLD_SIZE is '2'\): start several "):
        distributed.detect({"WORLD_SIZE": "2"})
    with pytest.raises(InputError, match="variable WORLD_SIZE is 'two', not a number"):
        distributed.detect({"WORLD_SIZE": "two", "RANK": "0"})
    with pytest.raises(InputError, match="RANK 2 does not fit WORLD_SIZE 2"):
        distributed.detect({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


def test_one_gpu_per_process(monkeypatch):
    world = distributed.World(rank=3, size=4, local_rank=1)
    assert distributed.rank_device("cuda", distributed.World()) == "cuda"  # one process: unchanged
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.rank_device("auto", world) == "auto"  # no CUDA: auto finds MPS or the CPU as usual
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [distributed.rank_device(name, world) for name in ("auto", "cuda", "cuda:0", "cpu")] == [
        "cuda:1", "cuda:1", "cuda:0", "cpu"]
    with pytest.raises(DeviceError, match="LOCAL_RANK 2 has no GPU of its own: this machine has 2 CUDA device"):
        distributed.rank_device("auto", distributed.World(2, 4, 2))


def test_torchrun_without_its_store_is_one_clear_error(tiny_ckpt, tiny_config_path, tmp_path, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = model_flags(tiny_ckpt, tiny_config_path) + ["--outdir", str(tmp_path)]
    code, err = inline("txt2img", argv)
    assert code == 2 and err.strip() == ("txt2img.py: error: WORLD_SIZE is 2 but MASTER_ADDR and MASTER_PORT not "
                                         "set: start the processes with torchrun, which sets them")


# ---------------------------------------------------------------------------------------------- waiting at the end
@pytest.fixture
def fast_clock(monkeypatch):
    """Liveness and deadlines in fractions of a second instead of minutes."""
    monkeypatch.setattr(distributed, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(distributed, "HEARTBEAT_SECONDS", 0.02)
    monkeypatch.setattr(distributed, "LOST_SECONDS", 0.3)
    monkeypatch.setattr(distributed, "TIMEOUT", timedelta(seconds=0.5))


def rank_0_of_2() -> tuple[distributed.Group, torch.distributed.Store]:
    store = torch.distributed.HashStore()
    return distributed.Group(distributed.World(0, 2), store), store


def beating(store, rank: int, stop: threading.Event) -> threading.Thread:
    def beat():
        while not stop.wait(0.01):
            store.add(f"beat/{rank}", 1)
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    return thread


def test_waiting_ends_when_all_are_done(fast_clock):
    group, store = rank_0_of_2()
    store.set("done/1", b"1")
    store.add("done", 1)
    group.wait_for_all()
    assert store.add("done", 0) == 2


def test_waiting_stops_at_a_recorded_failure_or_interrupt(fast_clock):
    group, store = rank_0_of_2()
    store.set("failed/1", b"cannot write the sample: disk full")
    store.add("failures", 1)
    with pytest.raises(distributed.DistributedError, match="^rank 1 failed: cannot write the sample: disk full; "
                                                           "this process stops too$"):
        group.wait_for_all()
    group, store = rank_0_of_2()
    store.set("stopped/1", b"1")
    store.add("failures", 1)
    with pytest.raises(distributed.DistributedError, match="^rank 1 was interrupted; this process stops too$"):
        group.check()


def test_a_silent_peer_is_lost_and_a_live_one_waited_for(fast_clock, monkeypatch):
    group, store = rank_0_of_2()  # rank 1 never beats: killed outright
    start = time.monotonic()
    with pytest.raises(distributed.DistributedError, match="^rank 1 stopped without an error before finishing"):
        group.wait_for_all()
    assert time.monotonic() - start >= 0.3  # after LOST_SECONDS (and before the deadline: the message)
    monkeypatch.setattr(distributed, "TIMEOUT", timedelta(seconds=1.0))
    group, store = rank_0_of_2()
    stop = threading.Event()
    beating(store, 1, stop)  # alive, but never done: hung
    try:
        with pytest.raises(distributed.DistributedError, match="^rank 1 did not finish within 0 minutes after "
                                                               "this process"):
            group.wait_for_all()
        assert time.monotonic() - start >= 1.0
    finally:
        stop.set()


def test_a_live_peer_that_finishes_late_is_waited_for(fast_clock, monkeypatch):
    monkeypatch.setattr(distributed, "TIMEOUT", timedelta(seconds=30))
    group, store = rank_0_of_2()
    stop = threading.Event()
    beating(store, 1, stop)

    def finish_later():
        time.sleep(0.4)  # longer than LOST_SECONDS: only the heartbeat keeps it in the run
        store.set("done/1", b"1")
        store.add("done", 1)
        stop.set()
    threading.Thread(target=finish_later, daemon=True).start()
    group.wait_for_all()
    assert store.add("done", 0) == 2


def test_heartbeat_counts_until_stopped(fast_clock):
    group, store = rank_0_of_2()
    group.start_heartbeat()
    time.sleep(0.2)
    group.stop_heartbeat()
    time.sleep(0.05)
    count = store.add("beat/0", 0)
    assert count >= 3
    time.sleep(0.1)
    assert store.add("beat/0", 0) == count


# ---------------------------------------------------------------------------------------------- helpers
def model_flags(ckpt, config) -> list[str]:
    return ["--ckpt", str(ckpt), "--config", str(config), "--device", "cpu", "--safety_checker", "off",
            "--precision", "full"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], program: list[str], cwd: Path) -> subprocess.Popen:
    """``torchrun <args> <program>`` in its own session (so that a Ctrl-C can reach all its processes)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop(cli.TRACEBACK_ENV, None)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, *program], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung:\n{out}\n{err}")
    return proc.returncode, out, err


def inline(name: str, argv: list[str]) -> tuple[int, str]:
    """The script's main in this process, on one thread, under the same wrapper as a real run."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = cli.main(module.main, argv, prog=f"{name}.py")
    finally:
        torch.set_num_threads(threads)
    return code, err.getvalue()


def images(outdir: Path) -> dict[tuple[str, str], np.ndarray]:
    """(prompt, seed) -> pixels of every sample, checking that no two samples are the same image of the run."""
    found = {}
    for path in sorted((outdir / "samples").glob("*.png")):
        if path.read_bytes() == b"keep":  # not one of the run's
            continue
        with Image.open(path) as image:
            prompt, _, fields = parse_parameters(image.text["parameters"])
            assert (prompt, fields["Seed"]) not in found, f"{path}: a second copy of {prompt!r}, seed {fields['Seed']}"
            found[prompt, fields["Seed"]] = np.asarray(image.convert("RGB"))
    return found


def grid_pixels(outdir: Path) -> np.ndarray:
    (grid,) = outdir.glob("grid-*.png")
    with Image.open(grid) as image:
        return np.asarray(image.convert("RGB"))


def worker_errors(stderr: str) -> list[str]:
    """The scripts' own lines in torchrun's stderr (rank 0's progress bar may run into them; torchrun's summary
    repeats them after ``traceback :``)."""
    return re.findall(r"(?<!traceback : )(?:txt2img|img2img)\.py: [^\r\n]*", stderr)


FAILING = """\
import os, runpy, sys
sys.path.insert(0, {root!r})
from ldm.errors import OutputError
from ldm.inference.pipeline import Pipeline

generate = Pipeline.generate


def failing_on_rank_1(self, *args, **kwargs):
    if os.environ["RANK"] == "1":
        raise OutputError("cannot write the sample: disk full (injected on rank 1)")
    return generate(self, *args, **kwargs)


Pipeline.generate = failing_on_rank_1
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def runs(tiny_ckpt, tiny_config_path, tmp_path_factory):
    """Every torchrun run of this file, started together; then the single-process references in this process."""
    tmp = tmp_path_factory.mktemp("distributed")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    init = tmp / "init.png"
    Image.fromarray(np.linspace(0, 255, 64 * 64 * 3).astype(np.uint8).reshape(64, 64, 3)).save(init)
    model = model_flags(tiny_ckpt, tiny_config_path)
    # --per_image: a process's share may split a batch, and only images computed one at a time are bit-exact
    txt = model + ["--from-file", str(prompts), "--H", "64", "--W", "64", "--ddim_steps", "3", "--n_samples", "2",
                   "--n_iter", "2", "--seed", "7", "--per_image"]
    i2i = model + ["--init-img", str(init), "--prompt", "a blue square", "--ddim_steps", "4", "--strength", "0.5",
                   "--n_samples", "3", "--n_iter", "1", "--seed", "11", "--per_image"]
    (tmp / "txt2img" / "samples").mkdir(parents=True)
    (tmp / "txt2img" / "samples" / "00003.png").write_bytes(b"keep")  # numbering continues after it
    (tmp / "failing.py").write_text(FAILING.format(root=str(ROOT)))
    txt2img, img2img = [str(ROOT / "scripts" / "txt2img.py")], [str(ROOT / "scripts" / "img2img.py")]
    port = free_port()
    node = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
            f"localhost:{port}", "--rdzv_id", "test"]
    two = ["--standalone", "--nproc_per_node", "2"]
    procs = {
        "txt2img": torchrun(two, txt2img + txt + ["--outdir", str(tmp / "txt2img")], tmp),
        "img2img_node0": torchrun(node + ["--node_rank", "0"], img2img + i2i + ["--outdir", str(tmp / "i2i")], tmp),
        "img2img_node1": torchrun(node + ["--node_rank", "1"], img2img + i2i + ["--outdir", str(tmp / "i2i")], tmp),
        "failing": torchrun(two, [str(tmp / "failing.py")] + txt2img + model + [
            "--prompt", "a red circle", "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1",
            "--n_iter", "200", "--skip_grid", "--outdir", str(tmp / "failing")], tmp),
        "bad_flag": torchrun(two, txt2img + txt + ["--ddim_eta", "2", "--outdir", str(tmp / "bad")], tmp),
        "idle": torchrun(two, txt2img + model + ["--prompt", "a red circle", "--H", "64", "--W", "64",
                                                 "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1",
                                                 "--outdir", str(tmp / "idle")], tmp),
    }
    references = {
        "txt2img": inline("txt2img", txt + ["--outdir", str(tmp / "single_txt2img")]),
        "img2img": inline("img2img", i2i + ["--outdir", str(tmp / "single_i2i")]),
    }
    for name, (code, err) in references.items():
        assert code == 0, f"single-process {name}: {err}"
    results = {name: finish(proc) for name, proc in procs.items()}
    return tmp, results


def test_two_processes_make_every_image_once_with_the_single_process_pixels(runs):
    tmp, results = runs
    code, out, err = results["txt2img"]
    assert code == 0, err
    assert "process 0 of 2 (cpu): images 1-3 of 6" in out and "process 1 of 2 (cpu): images 4-6 of 6" in out
    assert out.count("Your samples are ready") == 1 and out.count("Global Step") == 1  # rank 0 only
    sharded, single = images(tmp / "txt2img"), images(tmp / "single_txt2img")
    assert sorted(sharded) == sorted(single) == sorted((p, str(7 + k)) for k, p in enumerate(PROMPTS * 2))
    for key, pixels in single.items():
        np.testing.assert_array_equal(sharded[key], pixels, err_msg=str(key))
    # both processes wrote into one folder: numbered after the existing 00003.png, no gaps, no leftovers
    names = sorted(os.listdir(tmp / "txt2img" / "samples"))
    assert names == [f"{i:05}.png" for i in range(3, 10)] and not any(n.startswith(TEMP_PREFIX) for n in names)
    # one grid, by rank 0, in the single-process order
    assert sorted(os.listdir(tmp / "txt2img")) == ["grid-0000.png", "samples"]
    np.testing.assert_array_equal(grid_pixels(tmp / "txt2img"), grid_pixels(tmp / "single_txt2img"))


def test_img2img_on_two_machines(runs):
    tmp, results = runs
    for node in ("img2img_node0", "img2img_node1"):
        assert results[node][0] == 0, results[node][2]
    assert "process 1 of 2 (cpu): images 3-3 of 3" in results["img2img_node1"][1]
    sharded, single = images(tmp / "i2i"), images(tmp / "single_i2i")
    assert sorted(sharded) == sorted(single) == [("a blue square", s) for s in ("11", "12", "13")]
    for key, pixels in single.items():
        np.testing.assert_array_equal(sharded[key], pixels, err_msg=str(key))
    np.testing.assert_array_equal(grid_pixels(tmp / "i2i"), grid_pixels(tmp / "single_i2i"))


def test_a_failing_rank_fails_the_run_with_its_error(runs):
    tmp, results = runs
    code, _, err = results["failing"]
    assert code != 0
    cause = "cannot write the sample: disk full (injected on rank 1)"
    lines = worker_errors(err)
    assert f"txt2img.py: error: {cause}" in lines, err  # rank 1's own line
    # rank 0 stops at its next image, with rank 1's error (or is stopped by torchrun, which then reports it)
    assert len(lines) == 2 and (f"txt2img.py: error: rank 1 failed: {cause}; this process stops too" in lines or
                                f"txt2img.py: error: rank 1 failed: {cause}; this process was stopped" in lines), err
    assert f"traceback : txt2img.py: error: {cause}" in err  # torchrun's summary names it too
    assert len(list((tmp / "failing" / "samples").glob("*.png"))) < 100  # rank 0 did not make its whole share


def test_a_bad_flag_fails_on_every_rank_alike(runs):
    _, results = runs
    code, _, err = results["bad_flag"]
    assert code != 0
    lines = worker_errors(err)
    assert len(lines) == 2 and len(set(lines)) == 1 and "--ddim_eta must be a finite number" in lines[0], err


def test_more_processes_than_images(runs):
    tmp, results = runs
    code, out, err = results["idle"]
    assert code == 0, err
    assert "process 1 of 2 (cpu): no images (the run has 1)" in out and out.count("Loading model") == 1
    assert len(images(tmp / "idle")) == 1 and grid_pixels(tmp / "idle").shape == (64, 64, 3)


def test_ctrl_c_stops_every_rank_cleanly(tiny_ckpt, tiny_config_path, tmp_path):
    outdir = tmp_path / "out"
    proc = torchrun(["--standalone", "--nproc_per_node", "2"], [str(ROOT / "scripts" / "txt2img.py")] + model_flags(
        tiny_ckpt, tiny_config_path) + ["--prompt", "a red circle", "--H", "64", "--W", "64", "--ddim_steps", "2",
                                        "--n_samples", "1", "--n_iter", "400", "--outdir", str(outdir)], tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((outdir / "samples").glob("*.png"))) < 4 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process of the group
    code, _, err = finish(proc)
    assert code != 0
    assert worker_errors(err) == ["txt2img.py: interrupted; the images saved so far are complete"] * 2, err
    samples = sorted((outdir / "samples").iterdir())
    assert len(samples) >= 4 and not [p for p in samples if p.name.startswith(TEMP_PREFIX)]
    for path in samples:
        with Image.open(path) as image:
            assert image.size == (64, 64)
    assert not list(outdir.glob("grid-*"))
