"""How one worker's training step talks to the others, per method family: the loop (``gradzip.train.loop``)
runs forward and backward on ``module``, then ``after_backward()``, the optimizer (where the worker has one)
and ``after_step()``; an exchange fills in what its family does there.

* :class:`HookExchange`: DDP with a communication hook (every method of kind "hook"); its work runs inside
  backward.
* :class:`ServerExchange`: dedicated parameter servers (DoubleSqueeze's server placements); the push and the
  reply follow backward, and the asynchronous variant's servers run the optimizer.
* :class:`GossipExchange`: decentralized methods; the worker's own SGD step, then gossip with the neighbours.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradzip.comm.collectives import CommStats
from gradzip.integrations.ddp import HookState, ddp_hook
from gradzip.integrations.paramserver import PSWorker
from gradzip.registry import build_gossip, family, get_spec, make_config, servers_needed
from gradzip.train.config import optimizer_momentum
from gradzip.train.summary import GossipSection, ServerSection

Evaluate = Callable[[nn.Module], float]


@dataclass(frozen=True)
class Settings:
    """What a family's exchange is built from: the method, its options, and the run's optimizer and waits."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    lr: float = 0.05
    momentum: float = 0.0
    """The optimizer's momentum (none where the method applies the run's momentum itself)."""
    bucket_cap_mb: float = 25.0
    timeout: float = 300.0
    """Seconds any wait on another process may take."""
    nan_policy: str = "skip"
    """What a NaN or an Inf in some worker's gradient does (:mod:`gradzip.comm.finite`)."""


class Exchange:
    """The base: no communication of its own (the pieces every family shares)."""

    in_backward = False
    """Whether the exchange's work runs inside backward (a DDP hook): the loop takes it out of the compute."""
    reference = "sent"
    """How the uncompressed reference (``stats.bytes_uncompressed``) would travel, for the compression ratio
    (``summary.ring_bytes``): ``"sent"``, point-to-point and moved as counted (the parameter servers' fp32
    push, gossip's D-PSGD messages), or ``"all_reduce"``, a plain fp32 all-reduce (the DDP-hook methods)."""

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        stats: CommStats | None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.model = model
        """The bare model: what is evaluated and compared between workers."""
        self.module = module
        """What the forward pass runs on (the DDP wrapper, or the model itself)."""
        self.optimizer = optimizer
        """The worker's optimizer; None where the update is applied by the pattern (asynchronous servers)."""
        self.stats = stats
        """The traffic this worker's exchange counted (None where nothing is counted: the benchmark's rivals)."""
        self.group = group
        """The process group of the training workers, for the metrics' collectives."""

    def after_backward(self) -> bool:
        """Between backward and the optimizer step. False: every worker skips this step (some worker's
        gradient held a NaN or an Inf, ``nan_policy="skip"``), with no optimizer step and no ``after_step``."""
        return True

    def after_step(self) -> None:
        """After the optimizer step."""

    def counters(self) -> tuple[float, float] | None:
        """Seconds spent in gradzip's exchange code so far, and of them the seconds blocked on other
        processes; None where they are not measured."""
        return None

    def traffic(self) -> tuple[int | None, int | None]:
        """Bytes sent and received so far (None where they are not counted)."""
        if self.stats is None:
            return None, None
        return self.stats.bytes_sent, self.stats.bytes_received

    @property
    def metric_s(self) -> float:
        """Seconds of metric-only work inside the steps so far (left out of the step times)."""
        return 0.0

    @property
    def last_metric(self) -> float | None:
        """The last step's consensus distance, where the exchange measures one."""
        return None

    def eval_model(self) -> nn.Module:
        """What this run delivers, to evaluate: every worker holds the same model."""
        return self.model

    def close(self) -> None:
        """End the exchange after the last step (every worker)."""

    def prepare_checkpoint(self) -> None:
        """Called before a step after which a checkpoint is written (every worker, the same step)."""

    def state_dict(self) -> dict[str, Any]:
        """The method's whole state on this worker (what a checkpoint keeps beside the model and optimizer)."""
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s state."""

    def report(self, evaluate: Evaluate) -> tuple[float | None, ServerSection | GossipSection | None]:
        """After the run's metrics, on every worker (collectives where the models differ): the test accuracy of
        what the run delivers (on rank 0, None elsewhere) and the family's part of the summary."""
        rank = dist.get_rank(self.group)
        return (evaluate(self.model) if rank == 0 else None), None


def _sgd(model: nn.Module, run: Settings) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=run.lr, momentum=run.momentum)


class HookExchange(Exchange):
    """DDP with a communication hook; ``register(ddp)`` registers it and returns gradzip's HookState (None for
    a hook that is not gradzip's, whose work then goes unmeasured)."""

    in_backward = True
    reference = "all_reduce"

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        run: Settings,
        register: Callable[[DDP], HookState | None],
    ) -> None:
        cuda = device.type == "cuda"
        ddp = DDP(model, device_ids=[device.index] if cuda else None, bucket_cap_mb=run.bucket_cap_mb)
        self.state = register(ddp)
        super().__init__(model, ddp, _sgd(ddp, run), self.state.stats if self.state is not None else None)

    def after_backward(self) -> bool:
        # The hook has already agreed on the step with the other workers, inside backward.
        return self.state is None or not self.state.step_skipped

    def counters(self) -> tuple[float, float] | None:
        if self.state is None:
            return None
        return self.state.hook_s, self.state.reducer.wait_s

    def state_dict(self) -> dict[str, Any]:
        return {} if self.state is None else {"hook": self.state.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.state is not None:
            self.state.load_state_dict(sd["hook"])


def gradzip_hook(
    method: str, options: dict[str, Any], nan_policy: str = "skip"
) -> Callable[[DDP], HookState]:
    """Registers method ``method``'s hook (its parameters named by the DDP model)."""

    def register(ddp: DDP) -> HookState:
        state, hook = ddp_hook(method, model=ddp, nan_policy=nan_policy, **options)
        ddp.register_comm_hook(state, hook)
        return state

    return register


class ServerExchange(Exchange):
    """Dedicated parameter servers: no DDP; the push and the reply follow backward."""

    def __init__(
        self,
        model: nn.Module,
        run: Settings,
        group: dist.ProcessGroup | None,
        server_states: list[dict[str, Any]] | None = None,
    ) -> None:
        self.servers = servers_needed(run.method, run.options)
        self.asynchronous = get_spec(run.method).kind == "server"
        own = {k: v for k, v in run.options.items() if k not in ("servers", "placement")}
        # Asynchronous: the servers run the optimizer (with the run's lr and momentum) on the authoritative
        # model, and the workers have none.
        extra: dict[str, Any] = {"lr": run.lr, "momentum": run.momentum} if self.asynchronous else {}
        self.ps = PSWorker(
            model, run.method, servers=self.servers, timeout=run.timeout, server_states=server_states,
            nan_policy=run.nan_policy, **extra, **own,
        )  # fmt: skip
        optimizer = None if self.asynchronous else _sgd(model, run)
        super().__init__(model, model, optimizer, self.ps.stats, group)
        self.seconds = 0.0
        self.section: ServerSection | None = None

    def after_backward(self) -> bool:
        start = time.perf_counter()
        go = self.ps.step()  # replaces the gradients (synchronous) or the parameters (asynchronous)
        self.seconds += time.perf_counter() - start
        return go

    def counters(self) -> tuple[float, float] | None:
        return self.seconds, self.ps.wait_s

    def close(self) -> None:
        stats = self.ps.close()  # the servers return once every worker has closed
        if stats:  # rank 0
            self.section = ServerSection.of(stats, self.servers, max(1, self.ps.step_count))

    def report(self, evaluate: Evaluate) -> tuple[float | None, ServerSection | GossipSection | None]:
        accuracy, _ = super().report(evaluate)
        return accuracy, self.section

    def prepare_checkpoint(self) -> None:
        self.ps.collect_server_states()

    def state_dict(self) -> dict[str, Any]:
        # Worker 0 also keeps the servers' states, which they handed it after the step just done.
        servers = {"servers": self.ps.server_states} if self.ps.server_states is not None else {}
        return {"worker": self.ps.state_dict(), **servers}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.ps.load_state_dict(sd["worker"])  # the servers' states went to them when the exchange was built


@torch.no_grad()
def averaged_model(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """A copy of ``model`` holding the mean over the workers of its parameters and of its floating-point
    buffers (BatchNorm's running statistics), a collective: the model decentralized training delivers. Its
    buffers follow the parameters: each worker's statistics describe its own data (skewed under non-IID
    splits), so rank 0's alone would not describe the averaged model's. Integer buffers (BatchNorm's step
    count) are the same on every worker and stay as they are."""
    world = dist.get_world_size(group)
    avg = copy.deepcopy(model)
    tensors = [*avg.parameters(), *(b for b in avg.buffers() if b.is_floating_point())]
    for t in tensors:
        total = t.detach().double()
        dist.all_reduce(total, group=group)
        t.copy_(total / world)
    return avg


class GossipExchange(Exchange):
    """Decentralized: no DDP and no gradient all-reduce (only the NaN check's ``world`` floats, unless
    ``nan_policy="off"``); the worker's own SGD step ("adapt"), then the gossip with its neighbours
    ("combine")."""

    def __init__(self, model: nn.Module, run: Settings) -> None:
        cfg = make_config(run.method, **run.options)
        self.gossip = build_gossip(
            run.method, model, cfg, timeout=timedelta(seconds=run.timeout), nan_policy=run.nan_policy
        )
        super().__init__(model, model, _sgd(model, run), self.gossip.stats)
        self.seconds = 0.0

    def after_backward(self) -> bool:
        start = time.perf_counter()
        go = self.gossip.check_gradients()  # one small all-reduce: every worker skips a poisoned step
        self.seconds += time.perf_counter() - start
        return go

    def after_step(self) -> None:
        start = time.perf_counter()
        self.gossip.step()
        self.seconds += time.perf_counter() - start

    def counters(self) -> tuple[float, float] | None:
        return self.seconds - self.gossip.metrics_s, self.gossip.comm.wait_s

    @property
    def metric_s(self) -> float:
        return self.gossip.metrics_s

    def state_dict(self) -> dict[str, Any]:
        return {"gossip": self.gossip.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.gossip.load_state_dict(sd["gossip"])

    @property
    def last_metric(self) -> float | None:
        return self.gossip.last_consensus_distance

    def eval_model(self) -> nn.Module:
        # The averaged model is what decentralized training delivers; averaging it is a collective.
        return averaged_model(self.model)

    def report(self, evaluate: Evaluate) -> tuple[float | None, ServerSection | GossipSection | None]:
        final_consensus = self.gossip.consensus_distance()  # a collective, never part of the gossip
        own = torch.tensor([evaluate(self.model)], dtype=torch.float64)
        device = next(self.model.parameters()).device
        own = own.to(device)  # NCCL reduces device tensors only
        gathered = [torch.zeros_like(own) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, own)
        avg = averaged_model(self.model)
        if dist.get_rank() != 0:
            return None, None
        topology = self.gossip.topology
        section = GossipSection(
            topology.name, topology.spectral_gap, [float(a) for a in gathered], final_consensus
        )
        return evaluate(avg), section


def build_exchange(
    model: nn.Module,
    device: torch.device,
    run: Settings,
    group: dist.ProcessGroup | None = None,
    server_states: list[dict[str, Any]] | None = None,
) -> Exchange:
    """The exchange of ``run.method``'s family. ``run.momentum`` is the run's; the optimizer runs without it
    where the method applies it itself (momentum correction). ``server_states``: the dedicated servers' to
    continue from (worker 0 of a resumed run)."""
    run = dataclasses.replace(run, momentum=optimizer_momentum(run.options, run.momentum))
    kind = family(run.method, run.options)
    if kind == "gossip":
        return GossipExchange(model, run)
    if kind == "server":
        return ServerExchange(model, run, group, server_states)
    return HookExchange(model, device, run, gradzip_hook(run.method, run.options, run.nan_policy))
