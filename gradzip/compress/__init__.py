"""Compressors and the tensor maths around them: one file per family, each reading like its paper's pseudocode.

Nothing here talks to other processes. Element-wise compressors (``identity``, ``fp16``, ``sign``, ``topk``,
``randomk``, ``qsgd``) follow the :class:`~gradzip.compress.base.Compressor` protocol and serve every
communication pattern; ``feedback`` keeps what compression dropped (workers and servers alike), ``fusion``
packs many tensors into one message, and ``lowrank`` with ``fused`` hold the maths of the low-rank methods.
"""
