"""An independent PyTorch implementation of the NB201 network, WRCor and the other proxies,
for parity and timing.

It reproduces the reference's module structure and hook semantics (SPEC sections 1 and 3a)
and the other proxies' reference conventions (SPEC 4, `torch_ref.proxies`) so that JAX
scores can be checked number for number. Needs the optional `torch` extra;
importing `wrcor_jax` itself never imports torch.
"""

from wrcor_jax.torch_ref.nb201 import (
    NB201TorchNetwork,
    build_network,
    load_flax_params,
    to_flax_params,
)
from wrcor_jax.torch_ref.proxies import PROXY_NAMES, torch_proxy_scores
from wrcor_jax.torch_ref.wrcor import (
    SITE_SETS,
    WRCorResult,
    act_cor,
    act_grad_cor,
    torch_scores,
    torch_site_terms,
    wrcor,
)

__all__ = [
    "PROXY_NAMES",
    "SITE_SETS",
    "NB201TorchNetwork",
    "WRCorResult",
    "act_cor",
    "act_grad_cor",
    "build_network",
    "load_flax_params",
    "to_flax_params",
    "torch_proxy_scores",
    "torch_scores",
    "torch_site_terms",
    "wrcor",
]
