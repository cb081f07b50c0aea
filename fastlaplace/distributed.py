"""Meta-training over several processes and machines with ``torch.distributed``.

A meta-batch is a set of independent tasks, so it splits over processes ("ranks"): each rank
computes the meta-objective of its share of the tasks, and the meta-gradients are averaged.
The meta-objective is a mean over tasks, so with equal shares the average of the ranks'
meta-gradients is the meta-gradient of the whole meta-batch. Launch with ``torchrun``, which
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``::

    torchrun --nproc_per_node 2 -m fastlaplace.train --meta-batch 24 ...

``python -m fastlaplace.train`` uses this module; a loop of one's own does the same::

    from fastlaplace import distributed

    ctx = distributed.init("cuda")                  # Gloo on CPU, NCCL on CUDA (GPU = LOCAL_RANK)
    device = distributed.local_device("cuda", ctx)
    tasks = distributed.local_tasks(meta_batch, ctx.world_size)   # ValueError unless it divides
    task_gen = torch.Generator().manual_seed(distributed.rank_seed(seed, ctx.rank))
    for it in range(iterations):
        batch = problem.sample("train", tasks, task_gen).to(device)
        optimizer.zero_grad()
        learner.meta_loss(*batch).backward()
        distributed.average_gradients(learner.parameters())
        optimizer.step()
    distributed.shutdown()

(or sample the global meta-batch identically on every rank and keep ``shard(batch, ctx)``).
``with distributed.session("cuda") as ctx:`` joins for a block and leaves at its end the
group it joined (``python -m fastlaplace.train`` runs so).
With one process (no ``torchrun``, or ``WORLD_SIZE=1``) nothing here calls
``torch.distributed``: :func:`init` returns a one-rank :class:`Context` and
:func:`average_gradients` returns at once. The module keeps no state of its own beyond the
process group ``torch.distributed`` holds.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
BUCKET_BYTES = 25 * 2**20


class PeerFailure(ConnectionError):
    """A collective operation failed: another rank stopped (crashed, was killed) or timed out."""


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` and its GPU on the machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_env(env=None) -> Context:
    """The context that ``torchrun``'s variables describe (one rank when they are absent)."""
    env = os.environ if env is None else env

    def read(name: str, default: int) -> int:
        value = env.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local = read("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return Context(rank, world, local)


def current() -> Context:
    """The context of the initialised process group (one rank when there is none)."""
    if not _initialized():
        return Context()
    import torch.distributed as dist

    return Context(dist.get_rank(), dist.get_world_size(), from_env().local_rank)


def backend_for(device) -> str:
    """NCCL for CUDA devices, Gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device(device, ctx: Context) -> str:
    """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` when distributed (one GPU per
    rank); ``cuda:N`` and ``cpu`` are kept as given."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and ctx.distributed:
        return f"cuda:{ctx.local_rank}"
    return str(device)


def init(device="cpu", timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Context:
    """Join the process group that ``torchrun``'s variables describe, with the backend of
    ``device``; a one-rank context, without touching ``torch.distributed``, when there is
    only one process. ``timeout`` bounds every wait for the other ranks, so that a rank that
    dies does not leave the others waiting for ever."""
    ctx = from_env()
    if _initialized():
        return current()
    if not ctx.distributed:
        return ctx
    import torch.distributed as dist

    # torch.distributed.nn takes group.WORLD as default arguments when it is imported; imported
    # after the group exists (the first optimiser imports it, through torch._dynamo), it keeps
    # the group alive past destroy_process_group, and Gloo's worker threads then outlive the
    # interpreter's finalisation, where freeing a Python-owned buffer aborts the process.
    import torch.distributed.nn

    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local_device(device, ctx))
    dist.init_process_group(backend=backend_for(device), timeout=timeout)
    return current()


def shutdown() -> None:
    """Leave the process group, if any, once every rank has reached this point (a rank that
    tears down its connections while another still uses them can abort the process)."""
    if _initialized():
        import torch.distributed as dist

        barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device="cpu", timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Iterator[Context]:
    """:func:`init` for the length of a block, which leaves the group (:func:`shutdown`) at its
    end if the block joined it; one already joined is left to whoever joined it. On an error
    the group is left to the process's end: other ranks may still be in a collective, and
    ``torchrun`` ends them."""
    joins = from_env().distributed and not _initialized()
    ctx = init(device, timeout)
    yield ctx
    if joins:
        shutdown()


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------------------- tasks
def local_tasks(meta_batch: int, world_size: int) -> int:
    """Tasks per rank; ``ValueError`` when the meta-batch does not divide by the world size."""
    if meta_batch % world_size:
        raise ValueError(f"a meta-batch of {meta_batch} tasks does not divide among {world_size} processes: choose "
                         f"a meta-batch that is a multiple of {world_size} (the meta-batch size is the global one)")
    return meta_batch // world_size


def task_slice(meta_batch: int, ctx: Context) -> slice:
    """This rank's tasks among the ``meta_batch`` tasks of a global meta-batch."""
    n = local_tasks(meta_batch, ctx.world_size)
    return slice(ctx.rank * n, (ctx.rank + 1) * n)


def shard(batch, ctx: Context):
    """This rank's share of a global meta-batch (a tuple of tensors [tasks, ...])."""
    s = task_slice(batch[0].shape[0], ctx)
    parts = [t[s] for t in batch]
    return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)  # a NamedTuple or not


def rank_seed(seed: int, rank: int, iteration: int = 0, stream: str = "tasks") -> int:
    """A seed for one rank's generator, derived from (seed, rank, iteration, stream)."""
    digest = hashlib.sha256(f"fastlaplace:{stream}:{seed}:{rank}:{iteration}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------- collectives
def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(what: str, fn):
    try:
        return fn()
    except RuntimeError as exc:  # DistBackendError and Gloo's connection errors
        text = " ".join(str(exc).split())[:200]
        raise PeerFailure(f"rank {current().rank}: {what} with the other ranks failed, probably because another "
                          f"rank stopped ({text})") from exc


def average_gradients(parameters, extras: Tensor | None = None, bucket_bytes: int = BUCKET_BYTES) -> Tensor | None:
    """Replace each parameter's gradient by its mean over the ranks (a missing gradient counts
    as zeros). The gradients are concatenated into flat buckets of about ``bucket_bytes``,
    one all-reduce each, all in flight at once. ``extras`` (a small tensor, e.g. the loss) is
    averaged too and returned. Nothing is done with one rank."""
    if not _initialized():
        return extras
    import torch.distributed as dist

    world = dist.get_world_size()
    if world == 1:
        return extras
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple, list[list[Tensor]]] = {}
    sizes: dict[tuple, int] = {}
    for p in params:
        key = (p.grad.device, p.grad.dtype)
        buckets = groups.setdefault(key, [[]])
        nbytes = p.grad.numel() * p.grad.element_size()
        if buckets[-1] and sizes.get(key, 0) + nbytes > bucket_bytes:
            buckets.append([])
            sizes[key] = 0
        buckets[-1].append(p.grad)
        sizes[key] = sizes.get(key, 0) + nbytes
    device = _comm_device()
    pending = []

    def launch():
        for buckets in groups.values():
            for grads in buckets:
                flat = torch.cat([g.reshape(-1) for g in grads]).to(device)
                pending.append((grads, flat, dist.all_reduce(flat, async_op=True)))
        if extras is not None:
            flat = extras.detach().reshape(-1).to(device, torch.float64)
            pending.append((None, flat, dist.all_reduce(flat, async_op=True)))
        for _, _, work in pending:
            work.wait()

    _collective("averaging the meta-gradients", launch)
    result = None
    for grads, flat, _ in pending:
        flat = flat / world
        if grads is None:
            result = flat.to(extras.device).reshape(extras.shape)
            continue
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return result


def all_gather_rows(tensor: Tensor) -> Tensor:
    """[world_size, *shape]: every rank's ``tensor`` (the same shape and dtype on every rank),
    on the CPU. With one rank, ``tensor[None]``."""
    if not _initialized():
        return tensor.detach().cpu()[None]
    import torch.distributed as dist

    device = _comm_device()
    local = tensor.detach().to(device).contiguous()
    rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    _collective("gathering", lambda: dist.all_gather(rows, local))
    return torch.stack(rows).cpu()


def gather_varlen(tensor: Tensor) -> list[Tensor]:
    """Every rank's 1-D ``tensor`` (lengths may differ; same dtype), on the CPU, by rank."""
    if not _initialized():
        return [tensor.detach().cpu()]
    lengths = all_gather_rows(torch.tensor([tensor.numel()], dtype=torch.int64)).flatten().tolist()
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.numel()] = tensor.detach().reshape(-1)
    rows = all_gather_rows(padded)
    return [row[:n] for row, n in zip(rows, lengths)]


def on_main_rank(fn, ctx: Context, errors: tuple[type[BaseException], ...] = (Exception,)):
    """``fn()`` run by rank 0 alone, its result returned on every rank; an exception of
    ``errors`` that it raises is raised on every rank (so all stop alike, with rank 0's
    message). With one process, simply ``fn()``."""
    if not ctx.distributed:
        return fn()
    outcome = None
    if ctx.is_main:
        try:
            outcome = ("ok", fn())
        except errors as exc:
            outcome = ("error", exc)
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled between the ranks of this job only)."""
    if not _initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    device = _comm_device() if dist.get_backend() == "nccl" else None
    _collective("broadcasting", lambda: dist.broadcast_object_list(box, src=src, device=device))
    return box[0]


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        _collective("waiting", dist.barrier)
