"""Triton kernels, imported as ``rmtkd.kernels``.

Empty until the Triton backend lands; importing this package never imports Triton.
"""
