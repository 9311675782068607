"""Several processes pruning one model together (``torchrun --nproc-per-node N -m pyprune prune``).

Every rank runs the same sequential pipeline over the same decoder layers, on its own share of
the calibration windows (contiguous, as equal as possible):

- Statistics. A rank's Hessian is a running mean over its ``n_r`` tokens,
  ``H_r = (2/n_r) sum x x^T``; the mean over all tokens is ``sum_r n_r H_r / sum_r n_r``. So the
  ranks all-reduce ``n_r H_r`` and ``n_r`` (summing or averaging the means would over-weight a
  rank with fewer tokens). Wanda's input norms and OWL's ratios are read from ``diag H``, so they
  follow. Linears that read the same input (q/k/v, gate/up) hold equal Hessians on every rank and
  are reduced once.
- Solves. The Linears of a layer are dealt to the ranks, largest cost first, each to the least
  loaded rank (the same deal on every rank). Each rank solves its own; then every weight is
  broadcast from the rank that solved it, so all ranks leave the layer with identical weights
  and compute identical inputs for the next layer from their own windows. Report records, and
  the per-Linear ``results`` of a post-solve hook (the INT4 codes), are gathered on every rank.

With the same windows, the result equals a single-process run up to the order of floating-point
summation in the Hessians (tests check identical masks and weights to a relative 1e-4).
"""
import os
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from pyprune.models.families import weight_matrix


class DistributedPruning:
    """The collective steps of a pipeline run over the ranks of ``group`` (default: the world)."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedPruning needs an initialized torch.distributed process group "
                               "(run under torchrun, or call init_from_env() first)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": str(dist.get_backend(self.group))}

    # -- calibration windows ----------------------------------------------------------------
    def sample_range(self, nsamples: int):
        """``(start, stop)`` of this rank's contiguous share of ``nsamples`` windows."""
        if nsamples < self.world_size:
            raise ValueError(f"{nsamples} calibration windows cannot be split over {self.world_size} ranks; "
                             f"use at least {self.world_size} windows or fewer processes")
        return self.rank * nsamples // self.world_size, (self.rank + 1) * nsamples // self.world_size

    def shard(self, tokens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if tokens is None:
            return None
        start, stop = self.sample_range(tokens.shape[0])
        return tokens[start:stop]

    # -- statistics -------------------------------------------------------------------------
    def reduce_statistics(self, stats: Dict[str, object]):
        """Replace each rank's :class:`LayerStats` by the statistics of all ranks' tokens
        (the Hessian, or only its diagonal when that is all that was collected)."""
        names = [n for n, s in stats.items() if s is not None and _statistic(s) is not None]
        if not names:
            return stats
        # Linears whose statistics are equal on *every* rank share one reduction.
        same = [1 if i and _same_stats(stats[names[i - 1]], stats[names[i]]) else 0 for i in range(len(names))]
        flags = torch.tensor(same, dtype=torch.int32, device=_statistic(stats[names[0]]).device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        for i, name in enumerate(names):
            s = stats[name]
            value = _statistic(s)
            if flags[i].item() == 1:
                prev = stats[names[i - 1]]
                value.copy_(_statistic(prev))
                s.nsamples = prev.nsamples
                continue
            count = torch.tensor([float(s.nsamples)], dtype=torch.float64, device=value.device)
            value.mul_(float(s.nsamples))  # the un-normalised sum (2 * sum x x^T, or its diagonal) of this rank
            dist.all_reduce(value, group=self.group)
            dist.all_reduce(count, group=self.group)
            total = int(count.item())
            if total > 0:
                value.div_(float(total))
            s.nsamples = total
        return stats
        # Linears whose Hessians are equal on *every* rank share one reduction.
        same = [1 if i and _same_stats(stats[names[i - 1]], stats[names[i]]) else 0 for i in range(len(names))]
        flags = torch.tensor(same, dtype=torch.int32, device=stats[names[0]].H.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        for i, name in enumerate(names):
            s = stats[name]
            if flags[i].item() == 1:
                prev = stats[names[i - 1]]
                s.H.copy_(prev.H)
                s.nsamples = prev.nsamples
                continue
            count = torch.tensor([float(s.nsamples)], dtype=torch.float64, device=s.H.device)
            s.H.mul_(float(s.nsamples))  # the un-normalised sum 2 * sum x x^T of this rank
            dist.all_reduce(s.H, group=self.group)
            dist.all_reduce(count, group=self.group)
            total = int(count.item())
            if total > 0:
                s.H.div_(float(total))
            s.nsamples = total
        return stats

    def all_reduce_mean(self, tensor: torch.Tensor, count: int) -> int:
        """In place: ``tensor`` (a mean over this rank's ``count`` items) becomes the mean over all
        ranks' items; returns the total count. For statistics other than Hessians (pre-passes)."""
        total = torch.tensor([float(count)], dtype=torch.float64, device=tensor.device)
        tensor.mul_(float(count))
        dist.all_reduce(tensor, group=self.group)
        dist.all_reduce(total, group=self.group)
        n = int(total.item())
        if n > 0:
            tensor.div_(float(n))
        return n

    # -- solves -----------------------------------------------------------------------------
    def assign(self, linears) -> Dict[str, int]:
        """``name -> rank`` that solves it: largest cost first, to the least loaded rank."""
        costs = []
        for order, (name, module) in enumerate(linears):
            out_f, in_f = weight_matrix(module).shape
            costs.append((-(out_f * in_f * in_f + in_f ** 3), order, name))  # OBS sweep + factorisation
        load = [0] * self.world_size
        owners = {}
        for neg_cost, _, name in sorted(costs):
            rank = min(range(self.world_size), key=lambda r: (load[r], r))
            owners[name] = rank
            load[rank] -= neg_cost
        return owners

    def share_solved(self, linears, owners: Dict[str, int], local_records: Dict[str, dict],
                     post_solve=None, name_prefix: str = "") -> List[dict]:
        """Broadcast each solved weight from its owner; gather the records (and a post-solve
        hook's ``results`` entries, keyed ``name_prefix + name``) on every rank. Returns the
        records in ``linears`` order."""
        for name, module in linears:
            weight = module.weight.data
            if not weight.is_contiguous():
                raise RuntimeError(f"{name}: weight is not contiguous; cannot broadcast it in place")
            # As bytes, so every dtype goes through every backend unchanged.
            dist.broadcast(weight.view(-1).view(torch.uint8), src=owners[name], group=self.group)
        results = getattr(post_solve, "results", None)
        mine = {name: (record, results.get(name_prefix + name) if isinstance(results, dict) else None)
                for name, record in local_records.items()}
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        merged = {}
        for part in gathered:
            merged.update(part)
        missing = [name for name, _ in linears if name not in merged]
        if missing:
            raise RuntimeError(f"no rank solved {missing}")
        if isinstance(results, dict):
            for name, (_, result) in merged.items():
                if result is not None:
                    results[name_prefix + name] = result
        return [merged[name][0] for name, _ in linears]

    def barrier(self):
        dist.barrier(group=self.group)

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


def _statistic(stats):
    return stats.H if stats.H is not None else stats.diagonal


def _same_stats(a, b) -> bool:
    x, y = _statistic(a), _statistic(b)
    return a.nsamples == b.nsamples and x.shape == y.shape and torch.equal(x, y)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device() -> str:
    """The compute device of this process: ``cuda:LOCAL_RANK`` when GPUs exist, else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def init_from_env(backend: Optional[str] = None) -> Optional[DistributedPruning]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): initialise the process group (NCCL with GPUs,
    gloo without), pin this process to its GPU and return a :class:`DistributedPruning`.
    Returns None in a single-process run."""
    if world_size_from_env() <= 1:
        return None
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(torch.device(local_device()))
        dist.init_process_group(backend=backend)
    return DistributedPruning()
