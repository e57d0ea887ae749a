"""Compressors: one file per family, each reading like its paper's pseudocode.

Element-wise compressors (``identity``, ``fp16``, ``sign``, ``topk``, ``randomk``, ``qsgd``) follow the
:class:`~gradzip.compress.base.Compressor` protocol and serve every communication pattern. The low-rank methods
(PowerSGD, ACP-SGD) act on matrices and own their rounds of communication.
"""
