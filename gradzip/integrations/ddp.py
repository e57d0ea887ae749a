"""The DDP communication-hook adapter: ``state, hook = gradzip.ddp_hook("acpsgd", rank=4)``.

A hook is a function of (state, bucket); the state holds the method's reducer, its traffic counters and the
map from parameters to names, so that ``state_dict()`` is keyed by parameter names, never by bucket index:
it survives DDP's bucket rebuild after the first iteration and a restart.
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations as real objects.
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradzip.comm.collectives import Comm, CommStats
from gradzip.comm.finite import check_nan_policy
from gradzip.compress.fusion import views_of
from gradzip.reducers.reducer import Bucket, Reducer
from gradzip.registry import family, get_spec


class HookState:
    """A hook's state: the method's reducer, its traffic counters and the names of the parameters.

    It may be built before ``init_process_group`` (Lightning's ``DDPStrategy(ddp_comm_state=...)`` needs it
    then, as torch's ``PowerSGDState(process_group=None)`` allows): the reducer and its process group (the
    default one, or the one given) are bound at the hook's first call, when DDP has one. ``stats`` exist from
    the start; a state loaded before the first call is applied when the reducer is bound."""

    def __init__(
        self,
        method: str,
        options: dict[str, Any],
        build: Callable[[Comm], Reducer],
        process_group: dist.ProcessGroup | None = None,
        model: nn.Module | None = None,
        nan_policy: str = "skip",
    ) -> None:
        self.method = method
        self.options = options
        self.nan_policy = nan_policy
        self.hook_s = 0.0  # seconds inside the hook, waits included (compression = hook_s - reducer.wait_s)
        self._build = build
        self._group = process_group
        self._stats = CommStats()
        self._reducer: Reducer | None = None
        self._comm: Comm | None = None
        self._loaded: dict[str, Any] | None = None  # a state loaded before the reducer was bound
        self._names: dict[int, str] = {}
        if model is not None:
            self.name_parameters(model)

    def name_parameters(self, model: nn.Module) -> None:
        """Key ``state_dict()`` by ``model``'s parameter names (the DDP module or the one it wraps); without
        it, parameters are named in the order the first step meets them."""
        for name, p in model.named_parameters():
            # A DDP wrapper prefixes "module."; strip it so a state saved with DDP loads without it.
            self._names[id(p)] = name.removeprefix("module.")

    @property
    def bound(self) -> bool:
        """Whether the reducer is bound to its process group (at the first hook call, or on first use)."""
        return self._reducer is not None

    @property
    def reducer(self) -> Reducer:
        """The method's reducer, bound to the process group on first use."""
        if self._reducer is None:
            if not dist.is_initialized():
                raise RuntimeError(
                    f"gradzip's {self.method} hook binds its process group at its first call, and "
                    "torch.distributed is not initialised yet: call init_process_group first"
                )
            self._comm = Comm(self._group, stats=self._stats)
            self._reducer = self._build(self._comm).use_nan_policy(self.nan_policy)
            if self._loaded is not None:
                self._reducer.load_state_dict(self._loaded)
                self._loaded = None
        return self._reducer

    @property
    def comm(self) -> Comm:
        """The process group and its traffic (bound with the reducer)."""
        self.reducer  # noqa: B018 (binds it)
        assert self._comm is not None
        return self._comm

    @property
    def stats(self) -> CommStats:
        return self._stats

    @property
    def step_skipped(self) -> bool:
        """Whether the last step was skipped because some worker's gradient held a NaN or an Inf
        (``nan_policy="skip"``): every worker's gradients are then zeros and its method state is as it was
        before the step. Skip ``optimizer.step()`` when it is true, on every worker."""
        return self._reducer is not None and self._reducer.step_skipped

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far (saved in ``state_dict()``)."""
        if self._reducer is None:
            return int((self._loaded or {}).get("skipped", 0))
        return self._reducer.skipped_steps

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
        # Before the first call: what was loaded, or the reducer bound now (a fresh one's state).
        reducer = (
            self._loaded if self._reducer is None and self._loaded is not None else self.reducer.state_dict()
        )
        return {
            "method": self.method,
            "options": dict(self.options),
            "stats": self.stats.to_dict(),
            "reducer": reducer,
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
        if self._reducer is None:
            self._loaded = sd["reducer"]  # applied when the reducer is bound
        else:
            self._reducer.load_state_dict(sd["reducer"])
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


def _build(method: str, cfg: Any, comm: Comm) -> Reducer:
    return get_spec(method).build(cfg, comm)


def back_off_scaler(scaler: Any) -> None:
    """Lower a ``torch.amp.GradScaler``'s scale as its own overflow check would: call it on a step the hook
    skipped. With fp16 mixed precision an Inf gradient is the scaler's signal to back off; the hook turns it
    into a skipped step, which must not leave the scale where it overflowed (every later step would too)."""
    if scaler is not None and scaler.is_enabled():
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())


def ddp_hook(
    method: str,
    *,
    process_group: dist.ProcessGroup | None = None,
    model: nn.Module | None = None,
    nan_policy: str = "skip",
    **options: Any,
) -> tuple[HookState, Any]:
    """Build method ``method`` with its options; returns ``(state, hook)`` for ``register_comm_hook``.

    It may be called before ``init_process_group``: the state binds its process group (``process_group``, or
    the default one) at the hook's first call.

    ``model`` (the DDP module or the wrapped one) names the parameters in ``state_dict()``; without it they
    are named in the order the first step meets them. ``nan_policy`` says what a NaN or Inf in any worker's
    gradient does (:mod:`gradzip.comm.finite`): ``"skip"`` skips the step on every worker, leaving the
    method's state as it was (check ``state.step_skipped`` before ``optimizer.step()``); ``"raise"`` raises
    ``NonFiniteGradient`` on every worker; ``"off"`` does not look. Every worker must pass the same policy (it
    decides who takes part in the step's agreement). With an fp16 ``GradScaler``, call
    ``back_off_scaler(scaler)`` on a skipped step. Unknown methods and options, and bad values, raise
    ``ValueError`` naming the valid ones.
    """
    spec = get_spec(method)
    cfg = spec.config_cls.from_options(method, options)
    check_nan_policy(nan_policy)
    if family(method, cfg.to_dict()) != "hook":
        spec.build(cfg, None)  # type: ignore[arg-type]  # raises, saying what trains this method instead

    # A partial of a module-level function, not a closure: the state pickles (Lightning's ddp_spawn does).
    state = HookState(
        method, cfg.to_dict(), functools.partial(_build, method, cfg), process_group, model, nan_policy
    )
    if dist.is_initialized():
        state.reducer  # noqa: B018  (bound now: a bad pairing or group fails here, not in backward)
    return state, _hook
