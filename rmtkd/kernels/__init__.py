"""Triton kernels: ``covariance`` (fused streaming covariance) and ``projected_linear``
(``(x V) W^T + b`` with ``x V`` on chip). Importing this package never imports Triton;
the submodules do, and :mod:`rmtkd.ops` imports them only when a Triton backend is used.
"""
