"""The training loop: one for every kind of run, ``gradzip train`` and ``gradzip bench`` alike.

A method family supplies how one worker's step talks to the others (an :class:`~gradzip.train.exchange.Exchange`:
a DDP hook, parameter servers, gossip after the optimizer step); the loop owns the steps, their timing in
parts, evaluation, the progress bar and the records the summaries are made of.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gradzip.train.exchange import Exchange
from gradzip.train.records import EvalRecord, LoopResult, StepRecord

# Test-set evaluation batch, bounding activation memory for the large models.
EVAL_BATCH = 1024

# Skipped steps in a row (a NaN or an Inf in some worker's gradient each time) after which a run stops: it
# is no longer training, and skipping on in silence would hand back the model of its last good step.
MAX_SKIPPED_IN_A_ROW = 20


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """Test accuracy of ``model`` on ``(x, y)``, in batches."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), EVAL_BATCH):
        logits = model(x[i : i + EVAL_BATCH].to(device))
        correct += int((logits.argmax(dim=1).cpu() == y[i : i + EVAL_BATCH]).sum())
    model.train(was_training)
    return correct / max(1, len(y))


def _clock(device: torch.device, synchronize: bool = True) -> Callable[[], float]:
    """The time once the device has finished what was queued (CUDA kernels run asynchronously); without
    ``synchronize``, the host's time alone."""
    if device.type != "cuda" or not synchronize:
        return time.perf_counter

    def now() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


class Checkpoints(Protocol):
    """Where the loop hands over its state, between steps."""

    def due(self, step: int) -> bool:
        """Whether a checkpoint follows step ``step`` (counted from 0)."""
        ...

    def save(self, steps_done: int, result: LoopResult) -> None:
        """Write the checkpoint of the run after ``steps_done`` steps (``result``: the loop's records so far)."""
        ...


def run_steps(
    ex: Exchange,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    evaluate_model: Callable[[nn.Module], float] | None = None,
    eval_every: int = 0,
    slowdown: float = 1.0,
    bar: Any = None,
    time_parts: bool = True,
    result: LoopResult | None = None,
    checkpoints: Checkpoints | None = None,
) -> LoopResult:
    """One step per batch: forward, backward, the exchange, the optimizer. ``evaluate_model`` runs every
    ``eval_every`` steps on what the exchange says is this run's model (outside the timed step);
    ``slowdown > 1`` makes this worker an emulated straggler whose steps take that many times as long.

    A step's time always waits for the device. Its parts (compute, optimizer) do too with ``time_parts``;
    without it, on CUDA, they are the host's view only, and the device keeps running ahead of the host
    between the step's ends (what ``gradzip train`` wants: it reports whole steps).

    ``result`` holds the records of the steps already done (a resumed run): the batches are those of the
    steps after them. ``checkpoints`` is told, between steps, when to prepare one and to write it.

    A step the exchange skips (some worker's gradient held a NaN or an Inf) runs no optimizer step and no
    ``after_step``; it is recorded (``skipped``) and the batch is not retried. ``MAX_SKIPPED_IN_A_ROW`` of
    them in a row stop the run."""
    now = _clock(device)
    mark = _clock(device, synchronize=time_parts)
    result = LoopResult() if result is None else result
    ex.module.train()
    in_a_row = 0
    for step, (x, y) in enumerate(batches, start=len(result.records)):
        due = checkpoints is not None and checkpoints.due(step)
        if due:
            ex.prepare_checkpoint()
        before = ex.counters()
        metric_before = ex.metric_s
        sent_before, received_before = ex.traffic()
        t0 = now()
        if ex.optimizer is not None:
            ex.optimizer.zero_grad(set_to_none=True)
        else:
            ex.module.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ex.module(x), y)
        loss.backward()
        t_backward = mark()
        if slowdown > 1:  # an emulated straggler: its compute takes `slowdown` times as long
            time.sleep((slowdown - 1) * (time.perf_counter() - t0))
        go = ex.after_backward()
        t_exchanged = mark()
        if go and ex.optimizer is not None:
            ex.optimizer.step()
        t_optimized = mark()
        if go:
            ex.after_step()
        # .item() synchronizes with the device, so the time includes the step's kernels and collectives.
        loss_value = loss.item()
        t_end = now()
        record = StepRecord(
            step=step,
            loss=loss_value,
            # The consensus distance's all-reduces are a metric: their time is not the method's.
            time=t_end - t0 - (ex.metric_s - metric_before),
            compute=t_backward - t0,
            optimizer=t_optimized - t_exchanged,
            consensus_distance=ex.last_metric,
            skipped=not go,
        )
        after = ex.counters()
        if before is not None and after is not None:
            record.exchange, record.wait = after[0] - before[0], after[1] - before[1]
            if ex.in_backward:  # a hook runs inside backward: forward+backward without the hook's work
                record.compute -= record.exchange
        sent, received = ex.traffic()
        if sent is not None and sent_before is not None:
            record.bytes_sent = sent - sent_before
        if received is not None and received_before is not None:
            record.bytes_received = received - received_before
        result.records.append(record)
        in_a_row = 0 if go else in_a_row + 1
        if in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise FloatingPointError(
                f"the last {in_a_row} steps (to step {step}) were all skipped for a NaN or an Inf in some "
                "worker's gradient: the run is not training. Check the data and try a smaller --lr; "
                "--nan-policy raise names the worker at the first one"
            )
        if go and not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}; try a smaller --lr")
        if evaluate_model is not None and eval_every and (step + 1) % eval_every == 0:
            # The evaluation's own time is left out of the training time it is stamped with.
            accuracy = evaluate_model(ex.eval_model())
            result.evals.append(EvalRecord(step + 1, result.train_time_s, accuracy))
        if bar is not None:
            bar.update(1)
            postfix = {"loss": f"{loss_value:.4f}"} if go else {"skipped": "NaN/Inf gradient"}
            if record.consensus_distance is not None:
                postfix["consensus"] = f"{record.consensus_distance:.2e}"
            bar.set_postfix(postfix, refresh=False)
        if due:
            assert checkpoints is not None
            checkpoints.save(step + 1, result)
    return result
