"""``gradzip bench``: methods measured side by side on an emulated cluster (or under torchrun on a real one),
through the same training loop as ``gradzip train``; and the kernel throughput of the reducers that ship.

Nothing here is imported by ``import gradzip``, and the emulated cluster's modules import only the standard
library, so a process that only needs a cluster starts without torch."""
