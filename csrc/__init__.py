"""CUDA C++ sources (shipped as package data; built on first use where torch has CUDA)."""
