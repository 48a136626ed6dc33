"""TENSOR_PARALLEL_SIZE=N: the worker starts its own N-1 other ranks, one process each
(``python -m llm_worker.parallel``), or takes the ranks torchrun gives it.

Every rank loads the model the same way (settings, default adapter), keeps its shard
(``model/sharding.py``) and joins one process group. Rank 0 keeps the doors, the scheduler, the
sampler and the prefix cache; the others build the same step runner over their own KV heads and
run each step rank 0 broadcasts (``engine/ranks.py``), until it tells them to stop.

Faults: a rank that fails to load fails the worker's start with its reason; a rank that ends while
serving breaks the group: rank 0 fails the requests in flight, and the processes that serve
(handler.py, the HTTP server) exit non-zero. A rank whose parent dies exits; collectives time out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from llm_worker.engine.ranks import Ranks, RankLost
from llm_worker.model.sharding import Reductions, Shape, Shard, check_adapter, describe_plan, plan_of, shard_adapter, shard_model
from llm_worker.settings import PROJECT_ROOT, SECRETS, Settings

log = logging.getLogger("llm_worker.parallel")  # also when run as __main__ (the other ranks)

SETTINGS_VARIABLE = "LLM_WORKER_RANK_SETTINGS"  # a rank's settings, as JSON (secrets travel as their own variables)
START_SECONDS = 1800.0  # the other ranks' load, at most (a 70B from a network volume)


class RankStartError(RuntimeError):
    """A rank failed to start; the message names it and says why."""


@dataclass
class TensorParallel:
    """This process's rank: its group, its shard of the model, and on rank 0 the other ranks'
    processes (none under torchrun)."""

    ranks: Ranks
    settings: Settings
    processes: dict[int, subprocess.Popen] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)  # rank -> read end of its status pipe
    shard: Shard | None = None
    reductions: Reductions | None = None
    address: str = "env"  # rank 0's store (host:port), or torchrun's environment
    threads: int | None = None  # this process's torch threads before a CPU split, given back at close

    # ------------------------------------------------------------------ every rank
    def prepare(self, model) -> None:
        """Cut the loaded model to this rank's shard; said in the start log."""
        shape = Shape.of(model)
        if self.ranks.device.type == "cpu":  # the ranks share the cores: more threads than cores would spin
            self.threads = torch.get_num_threads()
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.ranks.world))
        self.shard = Shard(self.ranks.rank, self.ranks.world, shape)
        self.ranks.kv_heads = self.shard.kv_heads
        started = time.perf_counter()
        kept = shard_model(model, self.shard)
        self.reductions = Reductions(self.ranks.reduce)
        self.reductions.install(model)
        self.adopt(model)
        log.info("Tensor parallel, %s; layers split as transformers' plan for %s says (%s); %.2f GiB of weights kept, in %.1f s",
                 self.shard.describe(), shape.architecture, describe_plan(plan_of(model)), kept / 2**30, time.perf_counter() - started)

    def check_adapter(self, config: dict, name: str) -> None:
        check_adapter(config, name, self.ranks.world)

    def adopt(self, model) -> None:
        """After adapters were loaded: cut their weights, and keep each all-reduce outermost."""
        for name in getattr(model, "peft_config", {}):
            shard_adapter(model, self.shard, name)
        self.reductions.install(model)

    # ------------------------------------------------------------------ rank 0
    def wait_for_ranks(self) -> None:
        """Until every other rank has loaded its shard (each says so on its status pipe), then join
        the group with them. A rank that says it failed, or ends, fails the start with its reason."""
        deadline = time.monotonic() + START_SECONDS
        waiting = dict(self.statuses)
        buffers = {rank: b"" for rank in waiting}
        while waiting:
            for rank, process in self.processes.items():
                if rank in waiting and process.poll() is not None and not _ready(waiting[rank], 0):
                    raise RankStartError(f"tensor-parallel rank {rank} ended at start with code {process.returncode}; its log lines say why")
            if time.monotonic() > deadline:
                raise RankStartError(f"tensor-parallel ranks {sorted(waiting)} did not load within {START_SECONDS:.0f} s")
            readable, _, _ = select.select(list(waiting.values()), [], [], 0.5)
            for rank in [rank for rank, fd in waiting.items() if fd in readable]:
                chunk = os.read(waiting[rank], 65536)
                buffers[rank] += chunk
                line = buffers[rank].decode(errors="replace").strip()
                if not chunk and not line:  # it ended before it could say why (e.g. at import): its log says
                    raise RankStartError(f"tensor-parallel rank {rank} ended at start with code {self._code(rank)}; its log lines say why")
                if b"\n" in buffers[rank] or not chunk:
                    if line != "loaded":
                        raise RankStartError(f"tensor-parallel rank {rank} failed to start: {line}")
                    os.close(waiting.pop(rank))
        self.ranks.join(self.address)

    def exit_when_lost(self, engine) -> None:
        """Once a rank is lost: wait for ``engine`` to fail what was in flight, end every rank, and
        exit this process with code 1, for its supervisor (RunPod, docker, systemd) to start it again."""
        def leave() -> None:
            if engine is not None:
                engine.wait_stopped(timeout=30)
            time.sleep(1.0)  # the failed requests' answers go out
            self.close()
            log.error("Exiting: the worker lost a tensor-parallel rank (%s)", self.ranks.lost)
            logging.shutdown()
            os._exit(1)

        self.ranks.on_lost.append(lambda reason: threading.Thread(target=leave, name="exit-on-lost-rank", daemon=True).start())

    def _code(self, rank: int) -> int | str:
        try:
            return self.processes[rank].wait(timeout=10)
        except subprocess.TimeoutExpired:
            return "unknown"

    def watch(self) -> None:
        """Rank 0: a rank's process that ends breaks the group (told to ``ranks.on_lost``); the
        others are ended at once, so that no collective waits on for its timeout."""
        self.ranks.on_lost.insert(0, lambda reason: self._end_ranks())
        for rank, process in self.processes.items():
            threading.Thread(target=self._watch_one, args=(rank, process), name=f"rank-{rank}-watch", daemon=True).start()

    def _watch_one(self, rank: int, process: subprocess.Popen) -> None:
        code = process.wait()
        self.ranks.mark_lost(f"rank {rank} ended (exit code {code})")

    def _end_ranks(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(OSError):
                process.terminate()

    def close(self) -> None:
        """Tell the other ranks to stop (unless the group is broken) and leave the group with them,
        wait for their processes a little, end any left. No process is left behind."""
        ranks = self.ranks
        stopping = ranks.leader and not ranks.lost and not ranks.closed and ranks.joined
        if stopping:
            try:
                ranks.tell("stop")
            except RankLost:
                stopping = False
        ranks.closed = True
        if stopping:  # every rank leaves the group at once: a group left alone waits for its peers
            ranks.leave()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for fd in self.statuses.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.statuses.clear()
        ranks.leave()
        if self.threads is not None:
            torch.set_num_threads(self.threads)


def _ready(fd: int, wait: float) -> bool:
    return bool(select.select([fd], [], [], wait)[0])


def rank_device(settings: Settings, rank: int) -> torch.device:
    """Rank r's device: cuda:r where CUDA is used, else the CPU."""
    from llm_worker.model.loading import resolve_device

    device = resolve_device(settings.device)
    return torch.device("cuda", rank) if device.type == "cuda" else device


def check_devices(settings: Settings, world: int) -> None:
    device = rank_device(settings, 0)
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise RankStartError(
            f"TENSOR_PARALLEL_SIZE={world} exceeds the {torch.cuda.device_count()} GPU(s) this machine has: one rank runs on each GPU"
        )


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def start(settings: Settings) -> TensorParallel | None:
    """Rank 0's side of TENSOR_PARALLEL_SIZE: the other ranks started (or torchrun's taken), or
    None for one device. Under torchrun a rank other than 0 follows here and exits."""
    world = settings.tensor_parallel_size
    if world == 1:
        return None
    check_devices(settings, world)
    if torch.distributed.is_initialized():
        raise RankStartError(
            "TENSOR_PARALLEL_SIZE: this process already leads a tensor-parallel worker (one process group per process); "
            "close that worker first"
        )
    if launched_by_torchrun():
        rank = int(os.environ["RANK"])
        if int(os.environ["WORLD_SIZE"]) != world:
            raise RankStartError(f"TENSOR_PARALLEL_SIZE={world}, but torchrun started {os.environ['WORLD_SIZE']} ranks")
        if rank != 0:
            sys.exit(follow(settings, rank, world, "env", status=None))
        return TensorParallel(Ranks(0, world, rank_device(settings, 0), settings.tensor_parallel_timeout), settings)
    address = f"127.0.0.1:{_free_port()}"
    parallel = TensorParallel(Ranks(0, world, rank_device(settings, 0), settings.tensor_parallel_timeout), settings, address=address)
    environment = {**os.environ, SETTINGS_VARIABLE: json.dumps(_plain(settings))}
    for secret in SECRETS:
        value = getattr(settings, secret, None)
        if value is not None:
            environment[secret.upper()] = value.get_secret_value()
    try:
        for rank in range(1, world):
            read, write = os.pipe()
            parallel.statuses[rank] = read
            parallel.processes[rank] = subprocess.Popen(
                [sys.executable, "-m", "llm_worker.parallel", "--rank", str(rank), "--world", str(world),
                 "--address", address, "--status-fd", str(write), "--parent", str(os.getpid())],
                env=environment, pass_fds=(write,), cwd=PROJECT_ROOT,  # where ``-m llm_worker`` imports from
            )
            os.close(write)
    except Exception:
        parallel.close()
        raise
    log.info("Tensor parallel over %d ranks: started ranks 1-%d (pids %s)", world, world - 1,
             ", ".join(str(p.pid) for p in parallel.processes.values()))
    return parallel


def _plain(settings: Settings) -> dict:
    """The settings as given, for another process (secrets left out: they travel as variables)."""
    return {key: value for key, value in settings.model_dump(mode="json").items() if key not in SECRETS}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_on_every_rank(settings: Settings):
    """Rank 0's load: (the model, its adapters, the ranks or None). Under tensor parallel the other
    ranks load beside it, and it waits until they have; a failure ends them all."""
    parallel = start(settings)
    try:
        loaded, adapters = load(settings, parallel)
        if parallel is not None:
            parallel.wait_for_ranks()
            parallel.watch()
    except BaseException:
        if parallel is not None:
            parallel.close()
        raise
    return loaded, adapters, parallel


def exit_when_a_rank_is_lost(worker) -> None:
    """For a process that serves this one worker (handler.py, the HTTP server): once a rank has
    ended and the requests in flight have failed, it exits with code 1."""
    if worker.parallel is not None:
        worker.parallel.exit_when_lost(worker.engine)


def load(settings: Settings, parallel: TensorParallel | None):
    """The model and its adapters as the settings say (the default adapter active), on every rank
    the same way; under tensor parallel cut to this rank's shard before any adapter is loaded."""
    from llm_worker.model.adapters import AdapterManager
    from llm_worker.model.loading import adapter_name, load_model, merge_lora

    loaded = load_model(settings, None if parallel is None else (parallel.ranks.rank, parallel.ranks.world))
    if parallel is not None:
        parallel.prepare(loaded.model)
        if settings.lora_weights and settings.merge_lora:  # into the rank's slices, the adapter cut as they are
            loaded.model, loaded.merged_adapter = merge_lora(loaded.model, settings, loaded.tokenizer, sharding=parallel)
    default = adapter_name(settings.lora_weights) if settings.lora_weights else None
    adapters = AdapterManager(settings, default=None if loaded.merged_adapter else default, merged=loaded.merged_adapter)
    if parallel is not None:
        adapters.sharding = parallel
    if adapters.default:
        loaded.model = adapters.activate(loaded.model, adapters.default, in_use=set())
    return loaded, adapters


# ---------------------------------------------------------------------- the other ranks
def follow(settings: Settings, rank: int, world: int, address: str, status: int | None) -> int:
    """A rank other than 0: load and cut the model as rank 0 does, join, then run what rank 0
    tells until it says stop. Returns the process's exit code."""
    from llm_worker.engine.device import device_for
    from llm_worker.engine.startup import start_runner
    from llm_worker.service import _context_length, engine_config

    device = rank_device(settings, rank)
    settings = settings.model_copy(update={"device": str(device)})
    ranks = Ranks(rank, world, device, settings.tensor_parallel_timeout)
    parallel = TensorParallel(ranks, settings, address=address)
    try:
        loaded, _ = load(settings, parallel)
        model = loaded.model
    except Exception as err:
        log.exception("rank %d failed to load", rank)
        _say(status, f"{type(err).__name__}: {err}")
        return 1
    _say(status, "loaded")
    try:
        ranks.join(address)
        config = engine_config(settings, _context_length(loaded))
        runner = start_runner(model, config, device, loaded.dtype, device_for(device), ranks)
        loaded_here: dict[str, tuple[str, str]] = {}  # name -> (folder, revision) of what rank 0 told
        with torch.inference_mode():
            while True:
                kind, *args = ranks.receive()
                if kind == "stop":
                    return 0
                if kind == "run":
                    runner.run(*args)
                elif kind == "capture":
                    runner.capture_pending()
                elif kind == "adapters":
                    model = sync_adapters(model, args[0], loaded_here, parallel)
                    runner.set_model(model)
    except RankLost as err:
        log.error("rank %d stops: %s", rank, err)
        return 1
    except Exception:  # rank 0's collectives fail once this process ends: it stops too
        log.exception("rank %d failed", rank)
        return 1
    finally:
        ranks.leave()


def sync_adapters(model, wanted: list[tuple[str, str, str]], loaded_here: dict, parallel: TensorParallel):
    """Make this rank's adapters rank 0's now: ``wanted`` (name, folder, revision); an adapter
    loaded again under its name (a new revision) is replaced. ``loaded_here``: name -> (folder,
    revision) of what rank 0 told before, kept up to date."""
    from llm_worker.model.adapters import load_into

    versions = {name: (folder, revision) for name, folder, revision in wanted}
    stale = [n for n in getattr(model, "peft_config", {}) if n not in versions or loaded_here.get(n, versions[n]) != versions[n]]
    for name in stale:
        model.delete_adapter(name)
        loaded_here.pop(name, None)
    for name, (folder, revision) in versions.items():
        if name not in getattr(model, "peft_config", {}):
            model = load_into(model, folder, name)
        loaded_here[name] = (folder, revision)
    parallel.adopt(model)
    return model


def _say(fd: int | None, line: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def _exit_with_parent(parent: int) -> None:
    """A rank whose parent (rank 0) is gone exits: no process is left behind."""
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description="One rank of a tensor-parallel worker (started by rank 0)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args()
    from llm_worker.logs import configure_logging

    settings = Settings(**json.loads(os.environ[SETTINGS_VARIABLE]))
    configure_logging(settings.log_level, prefix=f"[rank {args.rank}] ")
    threading.Thread(target=_exit_with_parent, args=(args.parent,), daemon=True).start()
    return follow(settings, args.rank, args.world, args.address, args.status_fd)


if __name__ == "__main__":
    sys.exit(main())
