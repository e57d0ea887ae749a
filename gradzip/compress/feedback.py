"""Error feedback: what compression dropped is added back next time. Workers and servers use the same piece.

    p = g + e;   send C(p);   e = p - decode(C(p))

On the hot path it allocates nothing after the first steps: ``compensate`` forms ``p`` inside the residual's
own buffer (or, staged, inside a second buffer kept for the purpose), and the caller turns that buffer into
the new residual in place (``Compressor.residual_``, or a low-rank method's ``M -= P Q^T``).
"""

from __future__ import annotations

from typing import Any

import torch

from gradzip.compress.base import Compressor


def encode_with_feedback(
    compressor: Compressor,
    x: torch.Tensor,
    stream: str,
    step: int,
    *,
    residual: bool,
    sent: torch.Tensor | None = None,
    compensate: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], Any]:
    """Encode flat ``x`` from the random stream of (``stream``, ``step``): the sequence every pattern runs.

    With ``compensate = (e, g)`` (from ``ErrorFeedback.compensation_buffers``), ``x`` is first set to error
    feedback's ``p = e + g``, in the same sweep as the encoding where the compressor has a kernel for it.

    With ``residual``, ``x``'s buffer becomes the new error-feedback residual ``x - decode(encode(x))`` in
    place (payloads hold copies, so this is safe). ``sent`` is the velocity of DGC's momentum correction: a
    sparsifier zeroes in it the entries this payload carries (momentum factor masking); a compressor that sends
    every entry leaves it alone."""
    compressor.select_stream(stream, step)
    payload, ctx = compressor.encode(x) if compensate is None else compressor.encode_sum(*compensate, x)
    if residual:
        compressor.residual_(x, payload, ctx)
    if sent is not None and compressor.sparsifies:
        compressor.mask_sent_(sent, ctx)
    return payload, ctx


class Staged:
    """Buffers by key whose updates can be held back until a step is agreed on (``nan_policy="skip"``).

    Unstaged, an update is written in place into the kept buffer. Staged, it goes to a second buffer of the
    same size (kept from step to step, so nothing is allocated after the first steps), and ``commit()`` makes
    it the kept one; ``rollback()`` leaves the kept buffers as they were before the step. Same arithmetic
    either way, so a run's numbers do not depend on the staging."""

    def __init__(self, staged: bool = False) -> None:
        self.staged = staged
        self.kept: dict[str, torch.Tensor] = {}
        self._spare: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}

    def _kept(self, key: str, like: torch.Tensor) -> torch.Tensor | None:
        """The kept buffer of ``key`` on ``like``'s device and dtype (moved there if it was loaded elsewhere,
        e.g. from a checkpoint read with ``map_location="cpu"``), or None the first time."""
        t = self.kept.get(key)
        if t is None:
            return None
        if t.shape != like.shape:
            raise ValueError(
                f"kept state of {key!r} has shape {tuple(t.shape)}, its gradient {tuple(like.shape)}"
            )
        if t.device != like.device or t.dtype != like.dtype:
            t = self.kept[key] = t.to(device=like.device, dtype=like.dtype)
        return t

    def _target(self, key: str, kept: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """Where this step's new value of ``key`` goes: the kept buffer itself, or (staged) a spare one."""
        if kept is not None and not self.staged:
            return kept
        out = self._spare.pop(key, None)
        if out is None or out.shape != like.shape or out.device != like.device or out.dtype != like.dtype:
            out = torch.empty_like(like, memory_format=torch.contiguous_format)
        if self.staged:
            self._pending[key] = out
        else:
            self.kept[key] = out
        return out

    def commit(self) -> None:
        """The step is agreed on: its staged buffers become the kept ones."""
        for key, new in self._pending.items():
            old = self.kept.get(key)
            self.kept[key] = new
            if old is not None:
                self._spare[key] = old
        self._pending.clear()

    def rollback(self) -> None:
        """The step is skipped: the kept buffers stay as they were before it."""
        if not self.staged and self.kept:
            raise RuntimeError("an unstaged update cannot be rolled back (build it with staged=True)")
        self._spare.update(self._pending)
        self._pending.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.kept.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.kept = {k: v.clone() for k, v in sd.items()}
        self._pending.clear()


class StepChanges:
    """What a step changes before the workers agree it goes ahead: ``staged`` buffers, and the ``generators``
    it draws from. ``begin()`` at the step's start (remembering where the generators are, when the step may be
    undone), then ``keep()`` or ``undo()``, which leaves every one of them as it was before the step."""

    def __init__(self, staged: list[Staged], generators: list[torch.Generator]) -> None:
        self.staged, self.generators = staged, generators
        self._rewind: list[tuple[torch.Generator, torch.Tensor]] = []

    def begin(self, undoable: bool = True) -> StepChanges:
        self._rewind = [(g, g.get_state()) for g in self.generators] if undoable else []
        return self

    def keep(self) -> None:
        for s in self.staged:
            s.commit()

    def undo(self) -> None:
        for s in self.staged:
            s.rollback()
        for g, state in self._rewind:
            g.set_state(state)


class ErrorFeedback(Staged):
    """The residuals ``e`` by key (see the module's docstring); ``staged`` holds a step's new residuals back
    until ``commit()``."""

    @property
    def residuals(self) -> dict[str, torch.Tensor]:
        return self.kept

    def set(self, key: str, residual: torch.Tensor) -> None:
        self.kept[key] = residual

    def compensate(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """``p = g + e``, in the buffer the caller must leave the new residual in: ``e``'s own, or (staged) a
        second one, which ``commit()`` makes the residual."""
        e = self._kept(key, g)
        p = self._target(key, e, g)
        if e is None:
            return p.copy_(g)
        return torch.add(e, g, out=p) if p is not e else e.add_(g)

    def compensation_buffers(self, key: str, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e, p)`` for a caller that forms ``p = g + e`` itself (a fused kernel) and leaves the new residual
        in ``p``: the kept residual (zeros the first time) and where the new one goes (``e`` itself unless
        staged)."""
        e = self._kept(key, g)
        p = self._target(key, e, g)
        if e is None:
            e = p.zero_() if not self.staged else torch.zeros_like(p)
        return e, p


class Velocity(Staged):
    """DGC's momentum correction (Lin et al. 2018): momentum accumulated before compression, ``u = m u + g``.

    With error feedback, optimizer momentum applied after decompression amplifies the bursts that the
    residuals release; accumulating it here instead keeps the effective update close to momentum SGD. A
    sparsifier then zeroes the sent entries of ``u`` (``Compressor.mask_sent_``)."""

    def __init__(self, momentum: float, staged: bool = False) -> None:
        super().__init__(staged)
        self.momentum = momentum

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        return self.kept

    def __call__(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """``g`` itself without momentum; else the updated velocity (kept here, keyed by name; staged, in a
        second buffer until ``commit()``)."""
        if not self.momentum:
            return g
        u = self._kept(key, g)
        out = self._target(key, u, g)
        if u is None:
            return out.copy_(g)
        return (torch.mul(u, self.momentum, out=out) if out is not u else u.mul_(self.momentum)).add_(g)
