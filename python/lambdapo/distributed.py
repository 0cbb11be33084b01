"""More than one process on one machine: data-parallel training under torchrun.

``torchrun --nproc-per-node=N -m lambdapo train ...`` starts N processes (ranks). The command
line sets the process group up before the trainer is built (:func:`init_process_group`,
called by :func:`lambdapo.process.configure_process`): NCCL on GPUs, rank r on
``cuda:LOCAL_RANK``; gloo on the CPU. One process has no process group, and everything here
is then a direct call or a no-op, so a single-process run is what it always was.

What the trainer takes from here:

* :class:`Parallel` (:func:`current`): rank, world size and the few collectives the loop
  needs (sums, maxima, agreement, objects).
* :func:`shard_policy`: the policy sharded with FSDP2 (``fully_shard``) behind
  :class:`ShardedModel`, replicated with DDP (:class:`ReplicatedModel`), or
  :class:`LocalModel` for one process (same interface). Shard
  units: every decoder layer is one; lambdapo's own root module (:class:`PolicyRoot`) holds
  the rest (embeddings, final norm, output head, tied or not) and every log-prob
  computation runs inside its forward (``policy(fn)``), so each parameter the computation
  touches, the head's weight handed to ``lambdapo_ext.linear_token_logprobs`` included, is
  unsharded where it is used and its gradient reduce-scattered. No model class is patched.
* Equal collectives on every rank: FSDP2 all-gathers in every forward of a unit, so all
  ranks must run the same forwards and backwards. :meth:`ShardedModel.full_weights`
  unshards the whole model (generation, where ranks finish at different steps, then runs no
  collective at all; the vLLM push; checkpoints); :func:`padded` extends each rank's
  micro-batches to the largest count with zero-weight copies; decisions that change the
  forward (the prompt-sharing check) are agreed with :meth:`Parallel.all_true`.
* The loss is that of one process on the global batch: every rank's share is divided by the
  global batch's totals, and the gradient reduction sums (its averaging is switched off), so
  the gradient is the one-process gradient; one reduce-scatter per optimizer step
  (:meth:`ShardedModel.gradient_sync`), clipping by the global norm
  (:meth:`ShardedModel.clip_grad_norm_`).
* :func:`reduce_step_metrics`: the step's metrics over the global batch.

FSDP2 keeps a 1/N share of parameters, gradients and optimizer states per rank, for full
fine-tuning and LoRA alike. Where it does not run (a torch or a process-group backend without
its collectives, :func:`fsdp_runs`), or with ``data_parallel=ddp``, the policy is replicated
instead (:class:`ReplicatedModel`, DDP): the same interface, the same one-process update.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Parallel:
    """Where this process stands among the run's processes, and the collectives the
    training loop uses (each a plain return in one process)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process (a process group exists)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run's outputs."""
        return self.rank == 0

    @property
    def collective_device(self) -> torch.device:
        """Where this rank's collective tensors live: its GPU with NCCL, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else \
            torch.device("cpu")

    def device(self, device: torch.device) -> torch.device:
        """The device this rank computes on: ``cuda:LOCAL_RANK`` for a CUDA run of several
        processes, else ``device``."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    # ------------------------------------------------------------------ collectives
    def _reduce(self, values: Sequence[float], op) -> list[float]:
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64,
                              device=self.collective_device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max_int(self, value: int) -> int:
        """The largest ``value`` of all ranks."""
        return int(self._reduce([value], dist.ReduceOp.MAX)[0])

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (the same answer everywhere)."""
        return bool(self._reduce([1.0 if flag else 0.0], dist.ReduceOp.MIN)[0])

    def all_gather_ints(self, values: list[int]) -> list[int]:
        """Every rank's ``values`` (each rank passes as many), concatenated in rank order."""
        if not self.enabled:
            return list(values)
        local = torch.tensor(values, dtype=torch.long, device=self.collective_device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).tolist()

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every rank's (picklable, small) ``value``, in rank order."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Waits until every rank has come here (nothing in one process)."""
        if self.enabled:
            dist.barrier()

    # ------------------------------------------------------------------ data
    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of ``items`` (sizes differ by at most one; a rank
        may get none when there are fewer items than ranks)."""
        n = len(items)
        start = n * self.rank // self.world_size
        end = n * (self.rank + 1) // self.world_size
        return list(items[start:end])

    def prompt_share(self, rows: Sequence[T]) -> list[T]:
        """This rank's whole prompts of a step's ``prompts_per_step`` prompts (every rank
        draws the same prompts and takes its slice).

        Raises:
            ValueError: the prompts do not split evenly over the ranks.
        """
        if len(rows) % self.world_size:
            raise ValueError(prompts_error(len(rows), self.world_size))
        return self.share(rows)


def prompts_error(prompts: int, world_size: int) -> str:
    """The error for ``prompts_per_step`` = ``prompts`` that ``world_size`` does not divide."""
    return (f"config prompts_per_step: {prompts} prompts cannot be split by whole groups "
            f"over {world_size} processes; use a multiple of {world_size} (or another "
            f"torchrun --nproc-per-node)")


SINGLE = Parallel()
_current = SINGLE


def current() -> Parallel:
    """This process's :class:`Parallel` (one process unless :func:`init_process_group` set
    up a group).

    Raises:
        RuntimeError: the process was started as one of several (torchrun's
            ``WORLD_SIZE`` > 1) but no process group was set up.
    """
    if not _current.enabled and _launched_world_size() > 1:
        raise RuntimeError("this process is one of several (WORLD_SIZE="
                           f"{_launched_world_size()}) but has no process group: call "
                           "lambdapo.process.configure_process(config) before building a "
                           "Trainer")
    return _current


def _launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_process_group(device: str, timeout_s: float) -> Parallel:
    """Joins the process group torchrun describes (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL when the run's ``device`` is a GPU
    (this rank's ``cuda:LOCAL_RANK`` becomes the current device), else gloo. Collectives
    wait at most ``timeout_s`` for the other ranks. Nothing happens in a single process.
    Returns (and remembers, :func:`current`) the process's :class:`Parallel`.

    Raises:
        ValueError: a CUDA run with more processes than GPUs.
    """
    global _current
    world = _launched_world_size()
    if world <= 1:
        _current = SINGLE
        return _current
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {rank} (LOCAL_RANK {local_rank}) has no GPU of its own: "
                             f"{torch.cuda.device_count()} visible, one per process is needed "
                             f"(torchrun --nproc-per-node=<GPUs>)")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        options = {"device_id": torch.device("cuda", local_rank)} if cuda else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **options)
    _current = Parallel(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=local_rank, backend=dist.get_backend())
    return _current


def shutdown() -> None:
    """Leaves the process group (at the end of a command); nothing in one process."""
    global _current
    if _current.enabled:
        if dist.is_initialized():
            # Trainers kept only by reference cycles hold DDP reducers and FSDP states on
            # this group: collected while it lives, not at interpreter exit after it is gone
            # (where a rank could abort: "terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()
    _current = SINGLE


# ---------------------------------------------------------------------- the sharded policy
class PolicyRoot(nn.Module):
    """lambdapo's root FSDP unit around the user's model: it owns the parameters outside
    the decoder layers (embeddings, final norm, output head), and ``root(fn)`` runs ``fn()``
    inside its forward, so that they are unsharded for the whole of ``fn`` (the decoder's
    forward and the head's weight used directly by the log-prob op)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[], T]) -> T:
        """``fn()``, with the root's parameters unsharded around it."""
        return fn()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers, each an FSDP unit: the decoder's ``layers`` (every
    transformers decoder-only model lambdapo trains), else its longest ``ModuleList``;
    empty when it has none (the whole model is then one unit)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return list(layers)
    lists = [m for m in decoder.children() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


class LocalModel:
    """The policy of a single process: the same interface as :class:`ShardedModel`, each a
    direct call."""

    sharded = False

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, fn: Callable[[], T]) -> T:
        """``fn()`` (a log-prob computation on :attr:`model`)."""
        return fn()

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``."""
        loss.backward()

    def full_weights(self, within: tuple[str, ...] | None = None
                     ) -> contextlib.AbstractContextManager[None]:
        """Nothing to gather: the weights are whole."""
        return contextlib.nullcontext()

    def gradient_sync(self, enabled: bool) -> None:
        """Nothing to synchronise in one process."""

    def clip_grad_norm_(self, max_norm: float) -> float:
        """The gradient's norm before clipping to ``max_norm`` (0: no clipping)."""
        return clip_grad_norm(self.model, max_norm)


class ShardedModel:
    """The policy sharded with FSDP2 over the process group (module docstring).

    ``policy(fn)`` runs ``fn`` (a log-prob computation on :attr:`model`) in the root unit's
    forward; :meth:`full_weights` gives every rank the whole model for a while; the
    gradient of an optimizer step is reduce-scattered once (:meth:`gradient_sync`) as a
    sum, so the rank's loss shares, divided by the global batch's totals, give the
    one-process gradient."""

    sharded = True

    def __init__(self, model: nn.Module, parallel: Parallel):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        self.model = model
        self.parallel = parallel
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (parallel.world_size,))
        layers = decoder_layers(model)
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        self.root = PolicyRoot(model)
        fully_shard(self.root, mesh=mesh)
        self._whole = False
        # name (in the model) -> FSDP unit; the root under "".
        self.units: dict[str, nn.Module] = {"": self.root}
        for name, module in model.named_modules():
            if isinstance(module, FSDPModule):
                self.units[name] = module
        # Sum, not average: each rank's share is already divided by the global totals. A
        # torch without these switches averages: the shares are then scaled by the world
        # size before their backward.
        self.loss_scale = 1.0
        if all(hasattr(unit, "set_gradient_divide_factor") and
               hasattr(unit, "set_force_sum_reduction_for_comms")
               for unit in self.units.values()):
            for unit in self.units.values():
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
        else:
            self.loss_scale = float(parallel.world_size)
        # The root's first forward makes it FSDP's root (before any layer runs on its own,
        # as in generation); the same collective on every rank. A root keeps its parameters
        # unsharded after a forward: resharded here, so that the modules hold the sharded
        # parameters, the ones the optimizer (built next) must step.
        self.root(lambda: None)
        self.root.reshard()
        if not layers:
            log.info("FSDP: no decoder layers found; the whole model is one shard unit")

    def __call__(self, fn: Callable[[], T]) -> T:
        return self.root(fn)

    def backward(self, loss: Tensor) -> None:
        """The backward of this rank's share of the loss (its gradient then sums over the
        ranks in the reduction)."""
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()

    @contextlib.contextmanager
    def full_weights(self, within: tuple[str, ...] | None = None) -> Iterator[None]:
        """Inside the block every rank holds the whole parameters (plain tensors in the
        modules, as in one process), and forwards run no collective; resharded after.
        ``within``: only the units whose names start with one of these prefixes (the root,
        which holds everything outside the layers, always). Every rank must enter it; inside
        a block of the whole model, a nested one changes nothing."""
        if self._whole:
            yield
            return
        units = {name: unit for name, unit in self.units.items()
                 if within is None or name == "" or f"{name}.".startswith(within)}
        for unit in units.values():
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        self._whole = within is None
        try:
            yield
        finally:
            self._whole = False
            for name, unit in units.items():
                unit.reshard()
                # The root keeps its parameters from forward to backward (FSDP's own
                # choice for a root); the layers free theirs after each forward.
                unit.set_reshard_after_forward(name != "", recurse=False)

    def gradient_sync(self, enabled: bool) -> None:
        """Whether the next backward reduce-scatters the accumulated gradient (the last
        micro-batch of an optimizer step) or only accumulates it (the others)."""
        self.root.set_requires_gradient_sync(enabled, recurse=True)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """The global norm of the sharded gradient (the one-process norm: torch reduces
        the DTensor shards' norms across ranks), clipped to ``max_norm`` (0: no clipping)."""
        return clip_grad_norm(self.model, max_norm)


class ReplicatedModel(LocalModel):
    """The policy of several processes where FSDP2 does not run (:func:`fsdp_runs`), or when
    asked for (``data_parallel=ddp``): a whole copy on every rank, its gradient all-reduced by
    DDP (``DistributedDataParallel``) around :class:`PolicyRoot`. DDP averages over the
    ranks, so each rank's loss share (divided by the global batch's totals) is scaled by the
    world size before its backward; the gradient is then the one-process gradient on every
    rank, and so are its norm and the optimizer's steps."""

    sharded = False

    def __init__(self, model: nn.Module, parallel: Parallel):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model)
        device = next(model.parameters()).device
        self.root = DistributedDataParallel(
            PolicyRoot(model), device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
        self.loss_scale = float(parallel.world_size)

    def __call__(self, fn: Callable[[], T]) -> T:
        return self.root(fn)

    def backward(self, loss: Tensor) -> None:
        """The backward of this rank's share of the loss, scaled against DDP's averaging."""
        (loss * self.loss_scale).backward()

    def gradient_sync(self, enabled: bool) -> None:
        """Whether the next backward all-reduces the accumulated gradient (the last
        micro-batch of an optimizer step; DDP's ``no_sync`` for the others)."""
        self.root.require_backward_grad_sync = enabled


DATA_PARALLEL_MODES = ("auto", "fsdp", "ddp")


def fsdp_runs(parallel: Parallel) -> bool:
    """Whether FSDP2 runs over ``parallel``'s process group: ``fully_shard`` is in this torch
    and the group's backend has the two collectives it is made of (all-gather and
    reduce-scatter into one tensor; gloo has them on the CPU in recent torch, NCCL on
    GPUs). Tried once on a one-element tensor per rank (every rank gets the same answer)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    device = parallel.collective_device
    # Their names from torch 2.13 on (the older ones are deprecated there).
    all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
    reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
    try:
        gathered = torch.empty(parallel.world_size, device=device)
        all_gather(gathered, torch.ones(1, device=device))
        reduced = torch.empty(1, device=device)
        reduce_scatter(reduced, torch.ones(parallel.world_size, device=device))
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        log.info("FSDP2 does not run on this process group (%s: %s)", type(exc).__name__, exc)
        return False
    return bool(reduced.item() == parallel.world_size)


def shard_policy(model: nn.Module, parallel: Parallel, mode: str = "auto"
                 ) -> LocalModel | ShardedModel | ReplicatedModel:
    """``model`` over ``parallel``'s processes, or as it is in one process. ``mode``
    (``data_parallel``): ``fsdp`` shards it with FSDP2 (:class:`ShardedModel`), ``ddp``
    keeps a copy per rank (:class:`ReplicatedModel`), ``auto`` takes FSDP2 where it runs
    (:func:`fsdp_runs`), else DDP. Call it before the optimizer is built (sharding replaces
    the parameters).

    Raises:
        ValueError: an unknown ``mode``, or ``fsdp`` where FSDP2 does not run.
    """
    if mode not in DATA_PARALLEL_MODES:
        raise ValueError(f"config data_parallel: {mode!r} is not one of {DATA_PARALLEL_MODES}")
    if not parallel.enabled:
        return LocalModel(model)
    if mode == "ddp":
        return ReplicatedModel(model, parallel)
    if fsdp_runs(parallel):
        return ShardedModel(model, parallel)
    if mode == "fsdp":
        raise ValueError(f"config data_parallel: fsdp, but FSDP2 does not run with torch "
                         f"{torch.__version__} on the {parallel.backend} process group "
                         f"(see the log); use data_parallel=ddp or auto")
    log.info("data_parallel=auto: FSDP2 does not run here; DDP instead (a whole copy of the "
             "policy per process)")
    return ReplicatedModel(model, parallel)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """The norm of ``model``'s gradient, whole or sharded, before it is clipped to
    ``max_norm`` (0: not clipped), by ``torch.nn.utils``, which reduces DTensor gradients
    across their mesh (a collective when sharded: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    norm = (torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else
            torch.nn.utils.get_total_norm([p.grad for p in params]))
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor (a DTensor), or ``tensor`` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def whole_state_dict(module: nn.Module, keep: bool) -> dict[str, Tensor]:
    """``module.state_dict()`` with every sharded tensor gathered whole (a collective: every
    rank calls it, in the same order). ``keep``: whether this rank keeps the gathered tensors
    (the rank that saves them); the others drop each as soon as it is gathered and get an
    empty dict."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in module.state_dict().items():
        whole = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            out[name] = whole
    return out


def like_parameter(value: Tensor, param: Tensor) -> Tensor:
    """A saved shard ``value`` of a state tensor shaped like ``param`` (an optimizer's
    moments) back as the DTensor that ``param`` is; ``value`` itself for a plain parameter
    or a state of another shape (a step count)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor) and not isinstance(value, DTensor) and \
            value.shape == param.to_local().shape and value.dim() > 0:
        return DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                  run_check=False, shape=param.shape, stride=param.stride())
    return value


# ---------------------------------------------------------------------- micro-batches
def padded(items: list[T], parallel: Parallel, filler: Callable[[], T]) -> list[tuple[T, float]]:
    """``items`` (a rank's micro-batches of an optimizer step) with weight 1, followed by
    zero-weight copies (the first item, or ``filler()`` when there is none) up to the
    largest count of any rank, so that every rank runs as many forwards and backwards."""
    target = parallel.max_int(len(items)) if parallel.enabled else len(items)
    out = [(item, 1.0) for item in items]
    if target > len(items):
        spare = items[0] if items else filler()
        out += [(spare, 0.0)] * (target - len(items))
    return out


# ---------------------------------------------------------------------- metrics
# How a step metric of the global batch is made from the ranks' values (others: the mean
# weighted by the ranks' responses).
_SUMMED = ("loss", "reward_errors")
_MAXIMUM = ("mismatch/abs_max", "gen_time", "middle_time", "train_time", "step_time")
_SAME = ("step", "lr", "grad_norm")
_PER_TOKEN = ("entropy", "mismatch/abs_mean", "mismatch/is_mean", "clip_frac", "ratio", "kl")


def reduce_step_metrics(metrics: dict, parallel: Parallel, *, sequences: int, tokens: int,
                        advantages: Tensor, clipped_per: str = "tokens") -> dict:
    """The step metrics of the global batch from each rank's ``metrics`` of its own
    ``sequences`` responses and ``tokens`` response tokens: sums for the loss shares and
    error counts, maxima for the worst mismatch and the times, the global values (equal on
    every rank) for the step, learning rate and gradient norm, token-weighted means for
    per-token quantities, the advantages' standard deviation over all ``advantages``, and
    response-weighted means for the rest. ``clipped_per``: what ``mismatch/is_clipped`` is
    a share of (``tokens``, or ``sequences`` for sequence-level correction). Every rank
    gets the same dict."""
    if not parallel.enabled:
        return metrics
    a = advantages.detach().double()
    local = {"metrics": metrics, "sequences": sequences, "tokens": tokens,
             "adv": (a.numel(), float(a.sum()), float((a * a).sum()))}
    ranks = parallel.all_gather_objects(local)
    total_seq = sum(r["sequences"] for r in ranks)
    total_tok = sum(r["tokens"] for r in ranks)
    per_token = _PER_TOKEN + (("mismatch/is_clipped",) if clipped_per == "tokens" else ())
    out = {}
    keys = list(dict.fromkeys(k for r in ranks for k in r["metrics"]))
    for key in keys:
        have = [r for r in ranks if key in r["metrics"]]
        values = [float(r["metrics"][key]) for r in have]
        if key in _SAME:
            out[key] = ranks[0]["metrics"].get(key, values[0])
        elif key in _SUMMED:
            out[key] = sum(values)
        elif key in _MAXIMUM:
            out[key] = max(values)
        else:
            by = "tokens" if key in per_token else "sequences"
            weights = [r[by] for r in have]
            out[key] = sum(v * w for v, w in zip(values, weights)) / max(sum(weights), 1)
    if "advantage/std" in out:
        n = sum(r["adv"][0] for r in ranks)
        s = sum(r["adv"][1] for r in ranks)
        ss = sum(r["adv"][2] for r in ranks)
        out["advantage/std"] = max((ss - s * s / n) / max(n - 1, 1), 0.0) ** 0.5 if n else 0.0
    if "tokens_per_s" in out and "gen_time" in out:
        out["tokens_per_s"] = total_tok / max(out["gen_time"], 1e-9)
    if "response_length" in out:
        out["response_length"] = total_tok / max(total_seq, 1)
    return out
