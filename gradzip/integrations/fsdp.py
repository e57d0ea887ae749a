"""Compressed gradient reduce-scatter for FSDP2 (``torch.distributed.fsdp.fully_shard``).

    state = gradzip.integrations.fsdp.compress(model, "topk", density=0.01)

FSDP2 reduce-scatters each ``FSDPModule``'s gradients: the flat input holds, for every owner ``j`` in turn,
the chunk of every gradient that owner ``j`` keeps (row ``j`` of ``input.view(world, -1)``). gradzip replaces
that collective on every ``FSDPModule`` in the tree (``FSDPModule.set_custom_reduce_scatter``) with
DoubleSqueeze's first pass, reused from :class:`~gradzip.reducers.parts.PartCodec`: each worker compresses the
row bound for each owner, one all-to-all carries the compressed rows, and each owner decodes and averages
what it received. The flat input is one "tensor" whose part ``j`` is exactly row ``j``, so random-k's
indices agree between a sender and the owner through their shared random stream, as in DoubleSqueeze.

Element-wise compressors only (``identity``, ``fp16``, ``signsgd``, ``topk``, ``randomk``, ``qsgd``): the
all-to-all needs payloads of a known size. Error feedback (``error_feedback=``) keeps, per worker, what
compression dropped from its whole unsharded gradient: one more gradient's memory per worker
(``state.residual_bytes``); on by default for the biased compressors, off for the unbiased and lossless ones.

Non-finite gradients: there is no step-wide skip here (FSDP2 reduce-scatters module by module, and its
``ShardedGradScaler`` or the user's own check decides about the step). A worker whose input holds a NaN or an
Inf leaves its residual as it was and sends that input compressed as it is, so the owners' gradients carry
the NaN exactly as FSDP2's own reduce-scatter would, and the residual is never poisoned.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradzip.comm.collectives import Comm, CommStats
from gradzip.comm.finite import nonfinite
from gradzip.compress.base import check_pairing
from gradzip.compress.feedback import ErrorFeedback, Velocity
from gradzip.config import make_compressor
from gradzip.reducers.parts import PartCodec

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
except ImportError as err:  # pragma: no cover - torch < 2.6
    raise ImportError(
        "gradzip.integrations.fsdp needs FSDP2 with custom reduce-scatter (torch >= 2.6)"
    ) from err

__all__ = ["COMPRESSORS", "FSDPCompression", "compress"]

COMPRESSORS = ("identity", "fp16", "signsgd", "topk", "randomk", "qsgd")
LOSSLESS = ("identity", "fp16")
_NO_MOMENTUM = Velocity(0.0)  # the reduce-scatter carries gradients; momentum stays the optimizer's


class _Compressed(ReduceScatter):
    """The reduce-scatter of one ``FSDPModule`` (named ``key``), done by ``owner``."""

    def __init__(self, owner: FSDPCompression, key: str) -> None:
        self.owner, self.key = owner, key

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> None:
        self.owner.reduce_scatter(self.key, output_tensor, input_tensor, group, op)


class FSDPCompression:
    """The state of gradzip's compressed reduce-scatter on one model: the compressor and its random stream,
    every worker's residuals (keyed by the ``FSDPModule``'s name in the model), steps and traffic."""

    def __init__(self, compressor: str, error_feedback: bool | None = None, **options: Any) -> None:
        if compressor not in COMPRESSORS:
            raise ValueError(
                f"compressor {compressor!r} cannot compress FSDP2's reduce-scatter; valid: {', '.join(COMPRESSORS)} "
                "(the all-to-all carries payloads of a known size: no low-rank methods)"
            )
        self.compressor_name = compressor
        self.compressor = make_compressor(compressor, **options)
        check_pairing(self.compressor, "FSDP2's compressed reduce-scatter")
        if error_feedback is None:  # what compression drops must come back unless it is unbiased or lossless
            error_feedback = not (self.compressor.caps.unbiased or compressor in LOSSLESS)
        self.error_feedback = error_feedback
        self.options = {"compressor": compressor, "error_feedback": error_feedback, **options}
        self.ef = ErrorFeedback() if error_feedback else None
        self.stats = CommStats()
        """This worker's traffic: ``bytes_sent`` by the all-to-alls, ``bytes_uncompressed`` what FSDP2's own
        reduce-scatter would have sent (a ring's ``(world - 1) / world`` of each input), ``steps`` backward
        passes."""
        self.steps: dict[str, int] = {}
        self._codecs: dict[int, PartCodec] = {}
        self._comms: dict[int, Comm] = {}

    @property
    def residual_bytes(self) -> int:
        """Memory the error feedback holds on this worker (one unsharded gradient's worth)."""
        return sum(t.nbytes for t in self.ef.residuals.values()) if self.ef is not None else 0

    def _comm(self, group: dist.ProcessGroup) -> tuple[Comm, PartCodec]:
        comm = self._comms.get(id(group))
        if comm is None:
            comm = self._comms[id(group)] = Comm(group, stats=self.stats)
            self.compressor.independent_per_rank(comm.rank)  # QSGD's rounding: independent per worker
            self._codecs[id(group)] = PartCodec(self.compressor, comm.world)
        return comm, self._codecs[id(group)]

    def reduce_scatter(
        self, key: str, output: torch.Tensor, flat: torch.Tensor, group: dist.ProcessGroup, op: Any
    ) -> None:
        """``output`` = the reduction (mean for ``AVG``, sum for ``SUM``) of every worker's row ``rank``."""
        summed = op == dist.ReduceOp.SUM  # == rather than `in`: FSDP may pass a ReduceOp or its bare enum
        if not summed and op != dist.ReduceOp.AVG:
            raise ValueError(
                f"gradzip's FSDP2 reduce-scatter averages or sums; FSDP2 asked for {op} (a custom gradient divide "
                "factor is not supported)"
            )
        comm, codec = self._comm(group)
        world, me = comm.world, comm.rank
        step = self.steps.get(key, 0)
        x = flat.reshape(-1)
        if x.dtype != torch.float32:  # mixed precision's reduce dtype: compress in float32
            x = x.float()
        numels = (x.numel(),)
        # A NaN or an Inf must never enter a residual, where it would come back at every later step: such an
        # input travels as FSDP2's own reduce-scatter would carry it (so its GradScaler, or the user's check,
        # sees it), and the residual stays as it was.
        if self.ef is not None and not bool(nonfinite(x)):
            # DoubleSqueeze's worker half: g + e over the whole unsharded gradient, each part's residual kept.
            parts = codec.compress_worker(self.ef, _NO_MOMENTUM, [x], [key], "", step)
        else:
            parts = [codec.compress([codec.part_of(x, j)], [key], j, "", step, False) for j in range(world)]
        send = torch.zeros((world, codec.width(numels)), dtype=torch.uint8, device=x.device)
        for j, payloads in enumerate(parts):
            codec.pack(payloads, numels, j, send[j])
        received = comm.all_to_all(send).wait()
        mean = codec.aggregate(received, numels, [key], me, "", step)[0]
        output.copy_(mean.mul_(world) if summed else mean)
        self.stats.bytes_uncompressed += flat.nbytes * (world - 1) // world
        self.steps[key] = step + 1
        self.stats.steps = max(self.steps.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "options": dict(self.options),
            "steps": dict(self.steps),
            "residuals": self.ef.state_dict() if self.ef is not None else {},
            "compressor": self.compressor.state_dict(),
            "stats": self.stats.to_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("options") != self.options:
            raise ValueError(f"state was saved with options {sd.get('options')}; this one has {self.options}")
        self.steps = {k: int(v) for k, v in sd["steps"].items()}
        if self.ef is not None:
            self.ef.load_state_dict(sd["residuals"])
        self.compressor.load_state_dict(sd["compressor"])
        for k, v in sd["stats"].items():
            setattr(self.stats, k, int(v))


def compress(
    module: nn.Module, compressor: str, *, error_feedback: bool | None = None, **options: Any
) -> FSDPCompression:
    """Compress the gradient reduce-scatter of every ``FSDPModule`` in ``module``'s tree with ``compressor``
    (and its options: ``density``, ``levels``, ``seed``); call it after ``fully_shard``. Returns the state."""
    state = FSDPCompression(compressor, error_feedback, **options)
    found = [(name or "root", m) for name, m in module.named_modules() if isinstance(m, FSDPModule)]
    if not found:
        raise ValueError(
            f"no FSDPModule in {type(module).__name__}'s tree: call torch.distributed.fsdp.fully_shard on its "
            "layers and on it first"
        )
    for name, m in found:
        m.set_custom_reduce_scatter(_Compressed(state, name))
    return state
