"""A performance model of one training iteration, validated against the emulated cluster: what each method
would take on a cluster no single machine can run (``gradzip simulate``), which method to use on a given one
(``gradzip advise``), and the per-layer profile both start from (``gradzip profile``).

Layers: :mod:`~gradzip.sim.profile` (what a model costs on a device), :mod:`~gradzip.sim.network` (what a
collective costs on a link), :mod:`~gradzip.sim.timeline` (one iteration's events), :mod:`~gradzip.sim.plans`
(what each method puts where), :mod:`~gradzip.sim.grid` (tables, plots, advice), and
:mod:`~gradzip.sim.validate` (predicted against measured).
"""
