"""A method's predicted iteration on a cluster: its plan run through the timeline."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from gradzip.sim import timeline
from gradzip.sim.plans import Cluster, plan
from gradzip.sim.profile import ModelProfile


@dataclass(frozen=True)
class Prediction:
    """One method's predicted step (a mean over the steps of its cycle, e.g. ACP-SGD's P- and Q-step)."""

    method: str
    """The method as written (``NAME[:KEY=VALUE...]``)."""
    workers: int
    bandwidth: str
    iteration_s: float
    compute_s: float
    """Forward, backward and optimizer alone."""
    compression_s: float
    """Compute the method adds."""
    exposed_s: float
    """Communication not hidden behind compute."""
    link_s: float
    """Time the link is busy per step."""
    sent_bytes: float
    """Payload bytes a worker sends per step."""
    wire: str
    """What the method sends, in words."""
    timeline: timeline.Timeline
    """The first step of the cycle, with its segments."""


def predict(
    profile: ModelProfile,
    method: str,
    cluster: Cluster,
    options: dict[str, Any] | None = None,
    bandwidth: str = "",
    label: str | None = None,
) -> Prediction:
    p = plan(method, profile, cluster, options)
    backward = [layer.backward_s for layer in profile.layers]
    optimizer = profile.optimizer_s if p.worker_optimizer else 0.0
    cpu = cluster.link.uses_cpu
    runs = (
        [
            timeline.run(profile.forward_s, backward, optimizer, b, vote_s=p.vote_s, link_uses_cpu=cpu)
            for b in p.buckets
        ]
        if p.buckets is not None
        else [timeline.run(profile.forward_s, backward, optimizer, exchange=p.exchange, link_uses_cpu=cpu)]
    )

    def mean(name: str) -> float:
        return statistics.fmean(getattr(r, name) for r in runs)

    # A server serving every worker in turn bounds the step from below (asynchronous DoubleSqueeze).
    iteration = max(mean("iteration_s"), p.server_busy_s)

    return Prediction(
        method=label or method,
        workers=cluster.workers,
        bandwidth=bandwidth,
        iteration_s=iteration,
        compute_s=mean("compute_s"),
        compression_s=mean("compression_s"),
        exposed_s=statistics.fmean(r.exposed_s for r in runs) + iteration - mean("iteration_s"),
        link_s=mean("link_s"),
        sent_bytes=mean("sent_bytes"),
        wire=p.wire,
        timeline=runs[0],
    )
