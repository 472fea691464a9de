"""JAX/Flax reimplementation of the WRCor zero-shot neural architecture search proxy."""

__version__ = "0.1.0"
