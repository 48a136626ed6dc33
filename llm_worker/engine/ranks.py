"""The ranks of a tensor-parallel worker, as the engine sees them: one process group
(torch.distributed: NCCL on CUDA, gloo on the CPU) in which rank 0 runs the engine and
broadcasts each step's inputs, and every rank runs the same step on its own shard.

Rank 0 tells the others what to run (``tell``: one broadcast per step, a keep-alive while idle);
they follow (``follow``) with their own step runner until told to stop. The all-reduce after each
rowwise layer (``reduce``) is the only exchange inside a step. A collective that fails (a rank
died) or takes longer than ``timeout`` raises ``RankLost``: rank 0 fails the requests in flight
and the worker stops; the other ranks exit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

KEEP_ALIVE_SECONDS = 10.0  # while idle, rank 0 tells the others it is there at least this often


class RankLost(RuntimeError):
    """A tensor-parallel rank stopped answering: the worker cannot go on."""


class Ranks:
    """This process's place in the group: ``rank`` of ``world``, the group's collectives, and on
    rank 0 the watch over the other ranks' processes (``lost``: why the group broke, if it did)."""

    def __init__(self, rank: int, world: int, device: torch.device, timeout: float) -> None:
        self.rank, self.world, self.device, self.timeout = rank, world, device, timeout
        self.kv_heads: int | None = None  # this rank's share of the model's KV heads, once its shard is cut
        self.lost: str | None = None
        self.on_lost: list[Callable[[str], None]] = []
        self.closed = False
        self.joined = False
        self._lock = threading.Lock()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def join(self, address: str) -> None:
        """Join the group at ``address`` (host:port of rank 0's store), or the one torchrun set up."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        init = "env://" if address == "env" else f"tcp://{address}"
        dist.init_process_group(backend, init_method=init, rank=self.rank, world_size=self.world, timeout=timedelta(seconds=self.timeout))
        self.joined = True
        # steps' inputs travel on a group of the CPU's own (NCCL would move them through a GPU)
        self._control = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout)) if backend == "nccl" else None

    def reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` across ranks, in place."""
        try:
            dist.all_reduce(tensor)
        except Exception as err:
            raise self.broken("an all-reduce", err) from None

    def tell(self, *message) -> None:
        """Rank 0: the other ranks run ``message`` (a step's inputs, an adapter change, ...)."""
        if self.lost:
            raise RankLost(self.lost)
        try:
            dist.broadcast_object_list([message], src=0, group=self._control)
        except Exception as err:
            raise self.broken("a broadcast", err) from None

    def receive(self) -> tuple:
        """The other ranks: what rank 0 tells next."""
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self._control)
        except Exception as err:
            raise self.broken("waiting for rank 0", err) from None
        return box[0]

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's ``value`` (e.g. the KV blocks each device has room for)."""
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        except Exception as err:
            raise self.broken("agreeing on a size", err) from None
        return int(tensor.item())

    def mark_lost(self, reason: str) -> None:
        """The group is broken (a rank's process ended): said once, to whoever listens."""
        with self._lock:
            if self.lost or self.closed:
                return
            self.lost = reason
        log.error("Tensor parallel: %s", reason)
        for listener in self.on_lost:
            listener(reason)

    def broken(self, doing: str, err: Exception) -> RankLost:
        reason = self.lost or f"rank {self.rank}: {doing} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        if not self.closed:
            self.mark_lost(reason)
        return RankLost(reason)

    def leave(self) -> None:
        """Leave the group (once). With its peers gone first, tearing a group down can wait on
        them: it gets a few seconds on a thread of its own, then the process goes on without."""
        self.closed = True
        if not self.joined:
            return
        self.joined = False
        done = threading.Thread(target=_destroy, name="leave-process-group", daemon=True)
        done.start()
        done.join(timeout=5)
        if done.is_alive():
            log.warning("Tensor parallel: leaving the process group did not finish within 5 s; going on without")


def _destroy() -> None:
    try:
        dist.destroy_process_group()
    except Exception:  # a broken group may not tear down cleanly; the process goes on
        log.debug("destroying the process group failed", exc_info=True)
