"""Response sites reduced to correlation sums, the common currency of the WRCor family.

WRCor, act_cor and act_grad_cor (and their site-set variants) are all log-determinants of
weighted sums of |corrcoef| matrices of responses. An engine therefore never hands full
activations or gradients to a proxy: it reduces every response, where it is produced, to
its N x N |corrcoef| and adds it into a per-(block, kind) sum. Proxies weight those sums.

Kinds of site:
- `act`: the input of a hooked ReLU (a conv op's ReLU; the final ReLU's input),
- `act_out`: the final ReLU's output (what the reference's in-place ReLU hook sees),
- `act_grad`: dLoss/d(input of a hooked ReLU),
- `bn_grad`: dLoss/d(input of a conv op's BatchNorm), i.e. at the conv output,
- `block_act`, `block_act_grad`: MobileNetV2 only, the input of a block ReLU (the reference's
  `RELU`, which its hooks skip) and the gradient at it; `act` and `act_grad` there are the
  squeeze-and-excitation ReLU's, the sites the reference hooks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("act", "act_out", "act_grad", "bn_grad", "block_act", "block_act_grad")


def abs_corrcoef(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """|corrcoef| between the samples (rows) of x, and whether it is defined.

    numpy's corrcoef is NaN when a row has zero variance (an all-zero response behind a
    `none` edge, or a gradient that does not reach the loss); WRCor skips such terms, so
    the matrix comes back zeroed and `valid` False. Row norms are taken of the centred
    rows, so a constant row is caught exactly as numpy would produce NaN.
    """
    flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
    centred = flat - flat.mean(axis=1, keepdims=True)
    gram = jax.lax.dot_general(  # X X^T without materialising the transpose
        centred, centred, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST
    )
    norms = jnp.sqrt(jnp.diagonal(gram))
    valid = jnp.all(norms > 0)
    safe = jnp.where(norms > 0, norms, 1.0)
    corr = jnp.clip(gram / safe[:, None] / safe[None, :], -1.0, 1.0)
    return jnp.where(valid, jnp.abs(corr), 0.0), valid


BlockSums = dict[str, tuple[jax.Array, jax.Array]]
"""One block's running sums: kind -> (sum of |C| over valid terms (N x N), count of them)."""


def empty_block(batch_size: int) -> BlockSums:
    """Zero sums for every kind of one block."""
    zeros, none = jnp.zeros((batch_size, batch_size), jnp.float32), jnp.zeros((), jnp.int32)
    return {kind: (zeros, none) for kind in KINDS}


def add_term(
    block: BlockSums,
    kind: str,
    x: jax.Array,
    multiplicity: int | jax.Array = 1,
    active: bool | jax.Array = True,
) -> BlockSums:
    """Add `multiplicity` copies of the |corrcoef| term of response x to one block's sums.

    `active` (possibly traced) masks sites of ops an architecture does not use.
    """
    corr, valid = abs_corrcoef(x)
    keep = valid & active
    total, count = block[kind]
    return {
        **block,
        kind: (total + multiplicity * jnp.where(keep, corr, 0.0), count + multiplicity * keep),
    }


@jax.jit
def stack_blocks(blocks: list[BlockSums]) -> tuple[jax.Array, jax.Array]:
    sums = jnp.stack([jnp.stack([b[k][0] for k in KINDS]) for b in blocks])
    counts = jnp.stack([jnp.stack([b[k][1] for k in KINDS]) for b in blocks])
    return sums, counts


@dataclasses.dataclass(frozen=True)
class SiteSums:
    """Per-(block, kind) sums of |corrcoef| matrices and term counts of one architecture.

    sums[kind]: float64 (num_blocks, N, N); counts[kind]: int (num_blocks,). The last block
    of NB201 is the final BN-ReLU (block 17); MobileNetV2's blocks are its block list.
    """

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]

    @classmethod
    def from_blocks(cls, blocks: list[BlockSums]) -> SiteSums:
        """Gather the per-block device sums into float64 host arrays (one transfer)."""
        return cls.from_stacked(*jax.device_get(stack_blocks(blocks)))

    @classmethod
    def from_stacked(cls, sums: np.ndarray, counts: np.ndarray) -> SiteSums:
        """From host arrays (num_blocks, len(KINDS), N, N) and (num_blocks, len(KINDS))."""
        return cls(
            sums={k: np.asarray(sums[:, i], np.float64) for i, k in enumerate(KINDS)},
            counts={k: np.asarray(counts[:, i], np.int64) for i, k in enumerate(KINDS)},
        )

    @property
    def num_blocks(self) -> int:
        """Number of weighted blocks (NB201: 17 cells + the final BN-ReLU; MobileNetV2: 9)."""
        return self.sums[KINDS[0]].shape[0]
