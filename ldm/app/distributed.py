"""Several processes sharing one txt2img / img2img run, as started by ``torchrun`` (one or many machines).

torchrun gives each process ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the address of its key-value store
(``MASTER_ADDR``/``MASTER_PORT``). :func:`join` reads them: without them, or with ``WORLD_SIZE=1``, a run is one
process and nothing here touches torch.distributed. With more, each process takes the contiguous, balanced share
:func:`share` of the run's images (images are numbered in the single-process order), generates it on its own
device (:func:`rank_device`), and :meth:`Group.finish` waits for the others and hands every process's grid images
to rank 0.

The processes coordinate through torchrun's key-value store: a process that fails records its one-line error
there (the others stop before their next batch with ``rank N failed: ...``, on every machine) and in torchrun's
error file (torchrun's summary then shows that line instead of "To enable traceback see ..."); each one beats a
heartbeat there and says when it is done. Generation exchanges no tensors, so the process group is always gloo,
even on GPUs: its only collective is the gather of the uint8 grid images, which live on the CPU, and gloo
notices a dead peer (a closed socket) at once where NCCL waits for its timeout.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping

from ldm.errors import INTERRUPTS, DeviceError, InputError, LdmError, first_line

TIMEOUT = timedelta(minutes=30)  # joining the group, a store request, the least wait for a hung peer
POLL_SECONDS = 0.2  # how often a process that is done looks at the others
HEARTBEAT_SECONDS = 5.0
LOST_SECONDS = 90.0  # a peer whose heartbeat stops this long is lost (a long enough pause of the GIL is not)


class DistributedError(LdmError):
    """Another process of the run failed or stopped, or the processes cannot reach each other."""


@dataclass(frozen=True)
class World:
    """Where this process stands among the run's processes (all 0 / 1 for a single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes the grid and the run's messages (rank 0)."""
        return self.rank == 0


def detect(environ: Mapping[str, str] = os.environ) -> World:
    """The :class:`World` that torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` describe (one process
    when ``WORLD_SIZE`` is unset or 1)."""
    size = environ.get("WORLD_SIZE")
    if size is None or size.strip() == "1":
        return World()
    values = {}
    for name, text in (("WORLD_SIZE", size), ("RANK", environ.get("RANK")),
                       ("LOCAL_RANK", environ.get("LOCAL_RANK", environ.get("RANK")))):
        if text is None or not text.strip().isdigit():
            state = "not set" if text is None else f"{text!r}, not a number"
            raise InputError(f"environment variable {name} is {state} (WORLD_SIZE is {size!r}): start several "
                             f"processes with torchrun, or unset WORLD_SIZE for one process")
        values[name] = int(text)
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if world.size < 1 or world.rank >= world.size:
        raise InputError(f"RANK {world.rank} does not fit WORLD_SIZE {world.size}: start several processes with "
                         f"torchrun, or unset WORLD_SIZE for one process")
    return world


def share(total: int, world: World) -> range:
    """The images (numbers in ``range(total)``) this process makes: contiguous, sizes differing by at most one,
    the larger shares first, so that rank 0 always has image 0."""
    base, extra = divmod(total, world.size)
    start = world.rank * base + min(world.rank, extra)
    return range(start, start + base + (world.rank < extra))


def rank_device(name: str, world: World) -> str:
    """The ``--device`` this process uses: ``auto`` and ``cuda`` become ``cuda:LOCAL_RANK`` when several processes
    run and CUDA is present (one GPU per process); anything else is used as given (``cuda:N`` shares that GPU)."""
    if world.size == 1 or name not in ("auto", "cuda"):
        return name
    import torch

    if not torch.cuda.is_available():
        return name
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise DeviceError(f"process with LOCAL_RANK {world.local_rank} has no GPU of its own: this machine has "
                          f"{count} CUDA device(s); start at most {count} processes per machine "
                          f"(torchrun --nproc_per_node {count}), or pass --device cuda:0 to share one")
    return f"cuda:{world.local_rank}"


class Group:
    """The processes of one run: this one's :class:`World`, and (with several) the store and gloo group.

    Every process adds to its ``beat/<rank>`` counter in the store every :data:`HEARTBEAT_SECONDS` (from a
    thread, so also while loading or sampling); a process waiting at the end takes a peer whose counter stops for
    :data:`LOST_SECONDS` as lost (killed outright, or its machine gone), which no error of its own reports.
    """

    def __init__(self, world: World, store: Any = None):
        self.world = world
        self._store = store
        self._started = time.monotonic()
        self._stop_beating = threading.Event()

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size

    # ------------------------------------------------------------------ failures
    def peer_failure(self, include_stops: bool = True) -> str | None:
        """``rank N failed: <its error>`` when another process recorded a failure (or, with ``include_stops``,
        ``rank N was interrupted``); None while all are well."""
        if self._store is None or self._store.add("failures", 0) == 0:
            return None
        for rank in range(self.size):
            if rank == self.rank:
                continue
            if self._store.check([f"failed/{rank}"]):
                return f"rank {rank} failed: {self._store.get(f'failed/{rank}').decode('utf-8', 'replace')}"
            if include_stops and self._store.check([f"stopped/{rank}"]):
                return f"rank {rank} was interrupted"
        return None

    def check(self) -> None:
        """Raise :class:`DistributedError` if another process failed or stopped (call between batches)."""
        if self._store is None:
            return
        try:
            failure = self.peer_failure()
        except (RuntimeError, OSError) as err:  # the store is gone: its host (torchrun of node 0) stopped
            raise _lost_contact(err) from None
        if failure is not None:
            raise DistributedError(f"{failure}; this process stops too")

    def _record(self, err: BaseException) -> None:
        """Tell the other processes (best effort) that this one stops because of ``err``."""
        if self._store is None or isinstance(err, DistributedError):
            return  # a peer's failure: the peer recorded it
        interrupted = isinstance(err, INTERRUPTS)
        try:
            if interrupted:
                self._store.set(f"stopped/{self.rank}", b"1")
            else:
                self._store.set(f"failed/{self.rank}", error_line(err).encode("utf-8"))
            self._store.add("failures", 1)
        except (RuntimeError, OSError):
            pass

    # ------------------------------------------------------------------ liveness
    def start_heartbeat(self) -> None:
        """Beat in the store from a daemon thread until :meth:`stop_heartbeat`."""
        def beat() -> None:
            while True:
                try:
                    self._store.add(f"beat/{self.rank}", 1)
                except (RuntimeError, OSError):
                    return  # the store is gone: the main thread finds out by itself
                if self._stop_beating.wait(HEARTBEAT_SECONDS):
                    return

        threading.Thread(target=beat, name="ldm-heartbeat", daemon=True).start()

    def stop_heartbeat(self) -> None:
        self._stop_beating.set()

    # ------------------------------------------------------------------ the end
    def wait_for_all(self) -> None:
        """Say this process is done, and wait until every process is (raising :class:`DistributedError` when one
        failed, stopped, was lost, or is still not done ``max(TIMEOUT, this process's run time)`` later)."""
        store = self._store
        try:
            store.set(f"done/{self.rank}", b"1")
            store.add("done", 1)
        except (RuntimeError, OSError) as err:
            raise _lost_contact(err) from None
        limit = max(TIMEOUT.total_seconds(), time.monotonic() - self._started)  # a hung (alive) peer
        deadline = time.monotonic() + limit
        beats: dict[int, tuple[int, float]] = {}  # rank -> (last counter seen, when it changed)
        next_liveness = 0.0
        while True:
            self.check()
            now = time.monotonic()
            try:
                if store.add("done", 0) >= self.size:
                    return
                waiting = [r for r in range(self.size) if not store.check([f"done/{r}"])]
                if now >= next_liveness:
                    next_liveness = now + HEARTBEAT_SECONDS
                    for rank in waiting:
                        count = store.add(f"beat/{rank}", 0)
                        if rank not in beats or beats[rank][0] != count:
                            beats[rank] = (count, now)
            except (RuntimeError, OSError) as err:
                raise _lost_contact(err) from None
            lost = [r for r in waiting if r in beats and now - beats[r][1] > LOST_SECONDS]
            if lost:
                raise DistributedError(f"rank {_names(lost)} stopped without an error before finishing its images "
                                       f"(no sign of life for {LOST_SECONDS:.0f} s: killed, or its machine was "
                                       f"lost); see torchrun's messages on its machine")
            if now > deadline:
                raise DistributedError(f"rank {_names(waiting)} did not finish within {limit / 60:.0f} minutes "
                                       f"after this process (rank {self.rank}) did; it is stuck")
            time.sleep(POLL_SECONDS)

    def finish(self, items: list) -> list | None:
        """Wait until every process has finished its share, then gather everyone's ``items`` on rank 0 (in rank
        order; None on the other ranks). A single process gets its ``items`` back."""
        if self._store is None:
            return items
        import torch.distributed as dist

        self.wait_for_all()
        gathered = [None] * self.size if self.world.is_main else None
        try:
            dist.gather_object(items, gathered, dst=0)
        except RuntimeError as err:
            self.check()
            raise DistributedError(f"gathering the grid images failed ({first_line(err)}); see the errors of the "
                                   f"other processes") from None
        return None if gathered is None else [item for part in gathered for item in part]


def _names(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def _lost_contact(err: BaseException) -> DistributedError:
    return DistributedError(f"lost contact with the other processes of the run ({first_line(err)}): torchrun on "
                            f"the machine of rank 0, which keeps their store, has stopped; see the errors there")


def error_line(err: BaseException) -> str:
    """The one line a script prints for ``err`` (as :func:`ldm.app.cli.main` does)."""
    line = first_line(err)
    return line if isinstance(err, LdmError) else f"{type(err).__name__}: {line}"


def _write_error_file(line: str, environ: Mapping[str, str]) -> None:
    """Put ``line`` where torchrun's failure summary reads it (``TORCHELASTIC_ERROR_FILE``, in the form of
    torch.distributed.elastic's ``ErrorHandler``, with the line in place of the traceback)."""
    path = environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "ldm"
    try:
        with open(path, "w", encoding="utf-8") as f:
            message = f"{prog}: error: {line}"
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                      "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass


def _connect(world: World, environ: Mapping[str, str], timeout: timedelta) -> Group:
    import torch.distributed as dist

    if not dist.is_available():
        raise DeviceError(f"WORLD_SIZE is {world.size} but this torch build has no torch.distributed; run one "
                          f"process (without torchrun)")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
    if missing:
        raise InputError(f"WORLD_SIZE is {world.size} but {' and '.join(missing)} not set: start the processes "
                         f"with torchrun, which sets them")
    try:
        store, _, _ = next(dist.rendezvous("env://", world.rank, world.size, timeout=timeout))
        store.set_timeout(timeout)
        dist.init_process_group("gloo", store=dist.PrefixStore("ldm/pg", store), rank=world.rank,
                                world_size=world.size, timeout=timeout)
    except (RuntimeError, ValueError, OSError) as err:
        raise DistributedError(f"cannot join the other {world.size - 1} process(es) at "
                               f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']} ({first_line(err)}); "
                               f"check torchrun's --rdzv_endpoint / --master_addr") from None
    # keys of this attempt only: torchrun --max-restarts keeps the store across restarts
    attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    group = Group(world, dist.PrefixStore(f"ldm/run/{attempt}", store))
    group.start_heartbeat()
    return group


@contextmanager
def join(environ: Mapping[str, str] = os.environ, timeout: timedelta = TIMEOUT) -> Iterator[Group]:
    """The run's :class:`Group`: connected to the other processes when torchrun started several, left on exit.

    An exception leaving the block is recorded for the other processes (and torchrun's summary); an interrupt
    (SIGTERM from torchrun) that arrives because another process failed is replaced by that process's error.
    """
    world = detect(environ)
    if world.size == 1:
        yield Group(world)
        return
    import torch.distributed as dist

    group = _connect(world, environ, timeout)
    try:
        yield group
    except BaseException as err:
        if isinstance(err, INTERRUPTS):
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun forwards the Ctrl-C we already had
            try:
                failure = group.peer_failure(include_stops=False)
            except (RuntimeError, OSError):
                failure = None
            if failure is not None:
                err = DistributedError(f"{failure}; this process was stopped")
        group._record(err)
        if isinstance(err, Exception):
            _write_error_file(error_line(err), environ)
        if isinstance(err, DistributedError):
            raise err from None
        raise
    finally:
        group.stop_heartbeat()
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError, AssertionError):
            pass
