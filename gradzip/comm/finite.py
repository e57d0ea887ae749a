"""Non-finite gradients: how a worker notices one, how the workers agree on it, what they then do.

A NaN or Inf in one worker's gradient must never reach a residual or the wire: summed into an all-reduce
it poisons every worker's model at once, and kept in an error-feedback residual it comes back at every
later step. Each worker screens its own gradients before they enter the method; one collective per step
tells every worker whether any of them saw one, and who. Then, by the run's ``nan_policy``:

* ``skip`` (the default): every worker skips the step together. The method's state (residuals, factors,
  the ACP-SGD phase, velocity, random streams) and the model stay exactly as they were before it. The
  methods keep the step's new residuals in a second buffer until the step is agreed on, so this costs one
  more residual-sized buffer per worker (where the method has residuals) and no extra pass over them.
* ``raise``: every worker stops with :class:`NonFiniteGradient`, naming the step and the worker(s).
* ``off``: no screening and no agreement (the method as its paper states it; a NaN spreads).
"""

from __future__ import annotations

import torch

NAN_POLICIES = ("skip", "raise", "off")


def check_nan_policy(policy: object) -> str:
    """``policy`` if it is one of :data:`NAN_POLICIES`; ValueError naming the valid ones otherwise."""
    if not isinstance(policy, str) or policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy={policy!r} is invalid: it must be one of {', '.join(NAN_POLICIES)}")
    return policy


class NonFiniteGradient(FloatingPointError):
    """A worker's gradient held a NaN or an Inf under ``nan_policy="raise"``: every worker raises it.
    ``ranks``: the workers whose gradient it was (``more``: how many others, where only the first is known);
    ``step``: the step, counted from 0."""

    def __init__(self, ranks: list[int], step: int, where: str | None = None, more: int = 0) -> None:
        workers = ", ".join(map(str, ranks)) + (f" and {more} more" if more else "")
        detail = f" (in {where})" if where else ""
        super().__init__(
            f"non-finite gradient (NaN or Inf) on worker {workers} at step {step}{detail}; every worker stopped "
            "(--nan-policy raise). Check the data and try a smaller --lr, or --nan-policy skip to skip such steps"
        )
        self.ranks, self.step = ranks, step


def nonfinite(x: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on ``x``'s device: whether ``x`` holds a NaN or an Inf.

    One read of ``x`` and no temporary of its size: NaN and Inf propagate through a sum (Inf - Inf is NaN),
    so the sum is finite only if every entry is. A sum that overflows from finite entries (|x| near 3e38 in
    float32) counts too: such a gradient would overflow the all-reduce anyway. Half-precision gradients are
    summed in float32, where their largest values cannot overflow."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    total = x.sum(dtype=torch.float32) if low else x.sum()
    return ~torch.isfinite(total)


def any_nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor: whether any of ``tensors`` (on one device) holds a NaN or an Inf; computed on
    their device, without a synchronisation."""
    if not tensors:
        return torch.tensor(False)
    return torch.stack([nonfinite(t) for t in tensors]).any()


def first_nonfinite(tensors: list[torch.Tensor], names: list[str]) -> str | None:
    """The name of the first tensor that holds a NaN or an Inf (for the error message), or None."""
    for t, name in zip(tensors, names, strict=True):
        if bool(nonfinite(t)):
            return repr(name)
    return None


def flag_vector(bad: torch.Tensor | bool, rank: int, world: int, device: torch.device) -> torch.Tensor:
    """The vector a step's agreement all-reduces: 1 in this worker's slot when it saw a non-finite gradient.
    ``bad`` may stay a device tensor, so CUDA need not synchronise before the collective."""
    flags = torch.zeros(world, dtype=torch.float32, device=device)
    flags[rank] = bad if isinstance(bad, bool) else bad.to(torch.float32)
    return flags


def flagged(summed: torch.Tensor) -> list[int]:
    """The ranks whose slot is set in the all-reduced flag vector."""
    return [i for i, v in enumerate(summed.tolist()) if v]
