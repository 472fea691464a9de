"""An independent PyTorch implementation of the NB201 network and WRCor, for parity and timing.

It reproduces the reference's module structure and hook semantics (SPEC sections 1 and 3a)
so that JAX scores can be checked number for number. Needs the optional `torch` extra;
importing `wrcor_jax` itself never imports torch.
"""

from wrcor_jax.torch_ref.nb201 import (
    NB201TorchNetwork,
    build_network,
    load_flax_params,
    to_flax_params,
)

__all__ = [
    "NB201TorchNetwork",
    "build_network",
    "load_flax_params",
    "to_flax_params",
]
