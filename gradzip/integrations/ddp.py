"""The DDP communication-hook adapter: ``state, hook = gradzip.ddp_hook("acpsgd", rank=4)``.

A hook is a function of (state, bucket); the state holds the method's reducer, its traffic counters and the
map from parameters to names, so that ``state_dict()`` is keyed by parameter names, never by bucket index:
it survives DDP's bucket rebuild after the first iteration and a restart.
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations as real objects.
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradzip.comm.collectives import Comm, CommStats
from gradzip.comm.finite import check_nan_policy
from gradzip.compress.fusion import views_of
from gradzip.reducers.reducer import Bucket, Reducer
from gradzip.registry import get_spec


class HookState:
    def __init__(
        self,
        method: str,
        options: dict[str, Any],
        reducer: Reducer,
        comm: Comm,
        model: nn.Module | None = None,
    ) -> None:
        self.method = method
        self.options = options
        self.reducer = reducer
        self.comm = comm
        self.hook_s = 0.0  # seconds inside the hook, waits included (compression = hook_s - reducer.wait_s)
        self._names: dict[int, str] = {}
        self._named_by_model = model is not None
        if model is not None:
            for name, p in model.named_parameters():
                # A DDP wrapper prefixes "module."; strip it so a state saved with DDP loads without it.
                self._names[id(p)] = name.removeprefix("module.")

    @property
    def stats(self) -> CommStats:
        return self.comm.stats

    @property
    def step_skipped(self) -> bool:
        """Whether the last step was skipped because some worker's gradient held a NaN or an Inf
        (``nan_policy="skip"``): every worker's gradients are then zeros and its method state is as it was
        before the step. Skip ``optimizer.step()`` when it is true, on every worker."""
        return self.reducer.step_skipped

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far (saved in ``state_dict()``)."""
        return self.reducer.skipped_steps

    def _name(self, p: torch.Tensor) -> str:
        name = self._names.get(id(p))
        if name is None:
            # No model given: name parameters in the order the first step meets them, which is the same on
            # every worker and in every run of the same program.
            name = self._names[id(p)] = f"param{len(self._names)}"
        return name

    def bucket(self, gb: dist.GradBucket) -> Bucket:
        params = gb.parameters()
        buffer = gb.buffer()
        keys = [self._name(p) for p in params]
        return Bucket(buffer, views_of(buffer, [p.shape for p in params]), keys, gb.is_last(), gb.index())

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "options": dict(self.options),
            "stats": self.stats.to_dict(),
            "reducer": self.reducer.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("method") != self.method:
            raise ValueError(
                f"state was saved by method {sd.get('method')!r}; this hook runs {self.method!r}"
            )
        if sd.get("options") != self.options:
            raise ValueError(
                f"state was saved with options {sd.get('options')}; this hook has {self.options}"
            )
        known = set(CommStats.__dataclass_fields__)
        unknown = sorted(set(sd.get("stats", {})) - known)
        if unknown:
            raise ValueError(
                f"unknown stats field {unknown[0]!r} in state; valid: {', '.join(sorted(known))}"
            )
        self.reducer.load_state_dict(sd["reducer"])
        for k, v in sd.get("stats", {}).items():
            setattr(self.stats, k, int(v))


def _hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    start = time.perf_counter()
    try:
        return state.reducer.launch(state.bucket(bucket))
    except BaseException:
        state.reducer.abort_step()  # this step's half-finished buckets must not leak into the next one
        raise
    finally:
        state.hook_s += time.perf_counter() - start


def ddp_hook(
    method: str,
    *,
    process_group: dist.ProcessGroup | None = None,
    model: nn.Module | None = None,
    nan_policy: str = "skip",
    **options: Any,
) -> tuple[HookState, Any]:
    """Build method ``method`` with its options; returns ``(state, hook)`` for ``register_comm_hook``.

    ``model`` (the DDP module or the wrapped one) names the parameters in ``state_dict()``; without it they
    are named in the order the first step meets them. ``nan_policy`` says what a NaN or Inf in any worker's
    gradient does (:mod:`gradzip.comm.finite`): ``"skip"`` skips the step on every worker, leaving the
    method's state as it was (check ``state.step_skipped`` before ``optimizer.step()``); ``"raise"`` raises
    ``NonFiniteGradient`` on every worker; ``"off"`` does not look. Unknown methods and options, and bad
    values, raise ``ValueError`` naming the valid ones.
    """
    spec = get_spec(method)
    cfg = spec.config_cls.from_options(method, options)
    check_nan_policy(nan_policy)
    if not dist.is_initialized():
        raise RuntimeError("gradzip.ddp_hook needs torch.distributed initialised (init_process_group)")
    comm = Comm(process_group)
    reducer = spec.build(cfg, comm).use_nan_policy(nan_policy)
    return HookState(method, cfg.to_dict(), reducer, comm, model), _hook
