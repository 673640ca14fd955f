"""Data parallelism over the processes ``torchrun`` starts (``train.parallel``: none | ddp | fsdp).

Every process reads its own contiguous slice of each global batch. Loss terms are sums divided by counts
all-reduced over the processes, and the loss is scaled by the world size before backward to undo the
averaging of DDP and FSDP, so N processes compute the gradient one process computes on the whole batch.
DDP and FSDP2 wrap the model and the objective from outside as one :class:`TrainStep` module; FSDP2 shards
each block, then the embedding, and the root holds the final norm, the LM head and the objective's own
parameters (unsharded from the root's forward to its backward, so the objective may read them directly).
Checkpoints and evaluations use the full state, gathered on rank 0.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from nextlat.config import ConfigError, TrainConfig
from nextlat.data import Batch
from nextlat.model import Transformer
from nextlat.objectives.base import LossOutput, Objective
from nextlat.training.build import resolve_device, uses_bf16
from nextlat.training.checkpoint import OptimizerState


class TrainStep(nn.Module):
    """The backbone and the objective as one module whose forward is the loss: what DDP, FSDP2 and
    ``torch.compile`` wrap. Its parameter names are ``model.*`` and ``objective.*``, as in checkpoints."""

    def __init__(self, model: Transformer, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Batch) -> LossOutput:
        return self.objective(self.model, batch)


@dataclass
class Parallel:
    """This process's place in the job and the training step it runs (see :func:`parallelize`)."""

    mode: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    owns_group: bool = False
    root: nn.Module | None = None
    """The TrainStep, wrapped by DDP or sharded by FSDP2."""
    step: nn.Module | None = None
    """``root``, compiled when ``train.compile`` is set: called on each micro-batch."""
    eval_modules: tuple[Transformer, Objective] | None = None
    """FSDP: rank 0's unsharded copies of the model and objective, loaded with the gathered weights to evaluate."""

    @classmethod
    def local(cls, model: Transformer, objective: Objective, device: torch.device | str) -> Parallel:
        """One process, no process group: the step is the plain :class:`TrainStep`."""
        step = TrainStep(model, objective)
        return cls("none", torch.device(device), root=step, step=step)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch's example indices."""
        return indices.view(self.world, -1)[self.rank]

    def all_reduce(self, values: Tensor) -> Tensor:
        """Sum ``values`` over the processes (in place; a no-op without a process group)."""
        if self.mode != "none":
            dist.all_reduce(values)
        return values

    def global_counts(self, counts: dict[str, Tensor]) -> dict[str, Tensor]:
        """Counts summed over the processes, in one collective."""
        if self.mode == "none":
            return counts
        total = self.all_reduce(torch.stack([torch.as_tensor(v, device=self.device) for v in counts.values()]))
        return dict(zip(counts, total.unbind()))

    def sync_grads(self, last: bool):
        """Context of one micro-batch's forward and backward: gradients are reduced over the processes only on the
        step's last micro-batch."""
        if self.mode == "ddp" and not last:
            return self.root.no_sync()
        if self.mode == "fsdp":
            self.root.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.mode != "none":
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    # ------------------------------------------------------------------ full state on rank 0

    def full_weights(self, model: Transformer, objective: Objective) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The whole model's and objective's state dicts (collective under FSDP; empty on ranks other than 0)."""
        if self.mode != "fsdp":
            return model.state_dict(), objective.state_dict()
        state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in self.root.state_dict().items()}
        if not self.is_main:
            return {}, {}
        return _split(state, "model."), _split(state, "objective.")

    def full_optimizer_state(self, opt: torch.optim.Optimizer, names: dict[int, str]) -> OptimizerState:
        """The optimizer's whole state by parameter name (collective under FSDP; empty on ranks other than 0)."""
        if self.mode != "fsdp":
            return OptimizerState.of(opt, names)
        state = get_optimizer_state_dict(self.root, opt, options=_FULL)
        if not state:
            return OptimizerState([], {})
        return OptimizerState([{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]],
                              state["state"])

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: OptimizerState, names: dict[int, str]) -> None:
        """Load a whole optimizer state (every rank passes it; FSDP keeps each rank's shard)."""
        if self.mode != "fsdp":
            state.load_into(opt, names)
            return
        groups = [{**saved, "params": [names[id(p)] for p in group["params"]]}
                  for saved, group in zip(state.groups, opt.param_groups, strict=True)]
        set_optimizer_state_dict(self.root, opt, {"state": state.params, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))

    def evaluation_modules(self, model: Transformer, objective: Objective) -> tuple[Transformer, Objective] | None:
        """Modules rank 0 evaluates (the live ones, or under FSDP its copies loaded with the gathered weights);
        None on the other ranks. Collective under FSDP."""
        model_state, objective_state = self.full_weights(model, objective)
        if not self.is_main:
            return None
        if self.eval_modules is None:
            return model, objective
        copies = self.eval_modules
        copies[0].load_state_dict(model_state)
        copies[1].load_state_dict(objective_state)
        return copies


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _split(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def setup(t: TrainConfig) -> Parallel:
    """The process group of ``train.parallel`` from torchrun's environment (``nccl`` on CUDA, ``gloo`` on CPU, with
    ``train.dist_timeout``); a single process without torchrun gets a group of one. Under torchrun each process
    uses the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(t.device)
    if t.parallel == "none":
        if world > 1:
            raise ConfigError(f"train.parallel='none' but torchrun started {world} processes; "
                              "set train.parallel=ddp or fsdp")
        return Parallel("none", device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if t.batch_size % (world * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size}: must be a multiple of train.grad_accum={t.grad_accum} "
                          f"times the {world} processes")
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=t.dist_timeout)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Parallel(t.parallel, device, dist.get_rank(), dist.get_world_size(), owns)


def parallelize(model: Transformer, objective: Objective, t: TrainConfig, par: Parallel) -> Parallel:
    """Wrap model and objective for ``par.mode`` (DDP, or FSDP2 with bf16 parameters when ``train.precision``
    trains in bf16) and compile the step when ``train.compile`` is set; fills ``par.root`` and ``par.step``."""
    root: nn.Module = TrainStep(model, objective)
    if par.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [par.device.index] if par.device.type == "cuda" else None
        root = DistributedDataParallel(root, device_ids=ids, broadcast_buffers=False)
    elif par.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if par.is_main:
            par.eval_modules = copy.deepcopy((model, objective))
        mesh = init_device_mesh(par.device.type, (par.world,))
        bf16 = uses_bf16(par.device, t.precision)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model.embed_tokens, mesh=mesh, mp_policy=mp)
        fully_shard(root, mesh=mesh, mp_policy=mp)  # the root: final norm, LM head, the objective's parameters
    par.root = root
    par.step = torch.compile(root) if t.compile else root
    return par


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` on plain or FSDP-sharded (DTensor) gradients; returns the global norm."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()
