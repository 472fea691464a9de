"""Compile-bounded MobileNetV2-space responses: padded pieces composed at run time.

`capture.site_sums` traces one program per architecture, and almost no two sampled
architectures share every shape, so a search compiles all the time (30-45 s each at batch
64). Here each sub-block runs as compiled pieces (`pieces`: 1x1 convs with BatchNorm,
depthwise conv + squeeze-excite, stem, head) chained in Python, forward and then backward
from each cotangent asked for (docs/mbv2_engine.md). Every piece sees padded shapes
(`padding`): widths and rows rounded up to buckets, with zero weights and zero rows, and the
real sizes as run-time arguments that masks (`rows`) keep every statistic and correlation
to. A piece is then keyed by its rows or row tile, its width buckets and its stride, never
by the resolution, the kernel size or the exact widths, so compilations stop growing after
the first few dozen architectures. The stem (block 0, a k x k conv on the resized images)
runs exactly in NHWC, keyed by the resolution; it is the only place the resolution enters.
Padding changes no result beyond float32 summation order (tests/test_mbv2_engine.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wrcor_jax.responses import KINDS, SiteSums
from wrcor_jax.spaces.mbv2.arch import ConvBlock, MBV2Arch, ResBlock
from wrcor_jax.spaces.mbv2.measures import batch_halves
from wrcor_jax.spaces.mbv2.network import block_name, layer_name, se_channels
from wrcor_jax.spaces.mbv2.padding import (
    input_rows,
    pad_params,
    rows_bucket,
    side_after,
    tile_rows,
    unpad,
)
from wrcor_jax.spaces.mbv2.pieces import BLOCK_KINDS, PIECES, SE_KINDS, SE_SITES
from wrcor_jax.spaces.nb201_measures import _min_channel_eigenvalue
from wrcor_jax.spaces.nb201_pieces import cross_entropy


@dataclasses.dataclass
class _Call:
    """One piece applied in the forward pass: enough to run its backward. `path` is where
    its weights `w` sit in the parameter tree (a depthwise + SE piece's are two subtrees)."""

    piece: str
    path: tuple[str, ...]
    w: dict
    inputs: tuple
    dims: np.ndarray
    static: dict
    outputs: tuple


def _dims(*values: int) -> np.ndarray:
    return np.asarray(values, np.int32)


class MBV2Engine:
    """MobileNetV2-space measurements through padded pieces: the WRCor family's correlation
    sums at `kinds` (default: every MobileNetV2 kind) and, from the same forward pass, the
    input Jacobian (jacob_cov), the loss gradients (snip, grad_norm) and the activations
    (naswot, meco); the half-batch loss gradients (zico) and synflow's gradients."""

    def __init__(self, kinds: Sequence[str] = (*SE_KINDS, *BLOCK_KINDS)):
        self.kinds = frozenset(kinds)
        self._forget()

    def _forget(self) -> None:
        """Drop what the last pass recorded (its arrays: every piece's inputs and outputs)."""
        self._calls: list[tuple[int, _Call]] = []
        self._terms: list[tuple[int, dict]] = []
        self._acts: list[dict] = []
        self._put: set[int] = set()  # zeros the engine put in (`_start`, `_blank`)
        self._blanks: dict[tuple, jax.Array] = {}
        self._unread: set[int] = set()  # tiles whose only readers were skipped
        self._shared: list[jax.Array] = []  # small arrays every tile reads: statistics, gates

    @staticmethod
    def supports(arch: MBV2Arch) -> bool:
        """Whether the pieces build `arch`: a conv stem first, and later conv blocks only
        1x1 with stride 1 (as in every architecture of the reference ranges)."""
        first, *rest = arch.blocks
        return isinstance(first, ConvBlock) and all(
            isinstance(b, ResBlock) or (b.kernel == 1 and b.stride == 1) for b in rest
        )

    def _apply(
        self, piece: str, block: int, path: tuple, w: dict, inputs: tuple, dims, **static
    ) -> tuple:
        static["norm"], static["zen"] = self._norm, self._zen
        outputs, terms, acts = PIECES[piece].forward(
            w, inputs, dims, kinds=self._kinds, activations=self._activations, **static
        )
        self._calls.append((block, _Call(piece, path, w, inputs, dims, static, outputs)))
        self._terms.append((block, terms))
        self._acts.append(acts)
        return outputs

    def _forward(
        self,
        arch: MBV2Arch,
        params: dict,
        images: jax.Array,
        kinds: frozenset,
        norm: bool,
        activations: bool = False,
        zen: bool = False,
    ) -> jax.Array:
        """Run the pieces in order, recording each call, the forward terms at `kinds` and,
        with `activations`, what naswot and meco read; `zen` runs Zen-NAS's network (no
        residual links) and records its BatchNorm inputs' scales. Returns the logits."""
        if not self.supports(arch):
            raise ValueError(f"the engine does not build {arch.blocks}: see `supports`")
        self._forget()
        self._kinds, self._norm, self._activations, self._zen = kinds, norm, activations, zen
        self._tiled = not (activations or zen or kinds & frozenset(BLOCK_KINDS))
        self._dtype = images.dtype
        stem_block, *rest = arch.blocks
        side = side_after(arch.resolution, stem_block.stride)
        static = {
            "layers": stem_block.layers,
            "stride": stem_block.stride,
            "resolution": arch.resolution,
            "p_out": rows_bucket(side * side),
        }
        static["tiles"] = self._tile_count(static["p_out"])
        stem_dims = _dims(stem_block.out_channels)
        stem = (block_name(0),)
        x = self._apply("stem", 0, stem, params[stem[0]], (images,), stem_dims, **static)
        for index, block in enumerate(rest, start=1):
            w_block = params[block_name(index)]
            if isinstance(block, ResBlock):
                x, side = self._res_block(index, block, w_block, x, side)
                continue
            for j in range(block.layers):
                path = (block_name(index), layer_name(j))
                x = self._pointwise(index, path, w_block[path[1]], x, side, block.out_channels)
        last = len(arch.blocks) - 1
        (logits,) = self._apply("head", last, ("classifier",), params["classifier"], x, _dims(side))
        return logits

    def _tile_count(self, p: int) -> int:
        """How many tiles rows of `p` padded pixels run in: one where a 1x1 piece's sites,
        zen's statistics or naswot's and meco's activations are read (those need the whole)."""
        return p // tile_rows(p) if self._tiled else 1

    def _zeros(self, shape: tuple[int, ...], dtype=None) -> jax.Array:
        """Zeros put on the device from NumPy (a jitted zeros would compile per shape)."""
        return jax.device_put(np.zeros(shape, dtype or self._dtype))

    def _start(self, shape: tuple[int, ...]) -> jax.Array:
        """A running sum's start: zeros, remembered so that `_needed` never freezes them (the
        chain's first backward is then the same program as the others)."""
        start = self._zeros(shape)
        self._put.add(id(start))
        return start

    def _blank(self, shape: tuple[int, ...], dtype=None) -> jax.Array:
        """The zeros that stand in for a tile of padding rows only, whose 1x1 pieces are
        skipped (their outputs, sums and gradients there are exact zeros): one array per
        shape and pass, never frozen, so that its readers run the programs they run on
        real tiles."""
        key = (shape, np.dtype(dtype or self._dtype))
        if key not in self._blanks:
            self._blanks[key] = self._zeros(shape, key[1])
            self._put.add(id(self._blanks[key]))
        return self._blanks[key]

    def _pointwise(
        self, block: int, path: tuple, w: dict, tiles: tuple, side: int, channels: int,
        gate: jax.Array | None = None, residual: tuple = (), relu: bool = True,
        site: bool = True,
    ) -> tuple:  # fmt: skip
        """A 1x1 conv (of ReLU(tiles) x `gate` when gated: the project) and its BatchNorm,
        plus the `residual` tiles, then the ReLU when `relu`, tile by tile; `site`: the
        output is a ReLU's input. The statistics are running sums over the tiles: of the
        input's centred product where the output is not narrower than the input (`_expand`),
        else of the output. `w`: kernel, scale and bias, or (the shortcut) a biased conv's
        and its BatchNorm's."""
        if gate is not None:
            self._shared.append(gate)
        if "conv" in w:
            conv, bn = w["conv"], w["bn"]
            conv_path, bn_path = (*path, "conv"), (*path, "bn")
        else:
            conv, bn = {"kernel": w["kernel"]}, {"scale": w["scale"], "bias": w["bias"]}
            conv_path = bn_path = path
        c_in, c_out = conv["kernel"].shape[2:]
        norm, count = self._norm, len(tiles)
        dims = [_dims(side, channels, t) for t in range(count)]
        # the tiles past the image's rows hold padding only: their calls are skipped
        live = -(-side * side // tiles[0].shape[1])
        self._unread.update(id(x) for x in (*tiles[live:], *residual[live:]))
        blank = self._blank((*tiles[0].shape[:2], c_out)) if live < count else None
        padding = (blank,) * (count - live)

        def run(piece: str, at: tuple, weights: dict, inputs: tuple, t: int, **static) -> tuple:
            return self._apply(piece, block, at, weights, inputs, dims[t], **static)

        def running(piece: str, size: int, inputs: Callable[[int, jax.Array], tuple]):
            total = self._start(size)
            for t in range(live):
                (total,) = run(piece, path, {}, inputs(t, total), t)
            return total

        if gate is None and norm and c_in <= c_out and "bias" not in conv:
            total = running("rows_sum", (c_in,), lambda t, acc: (tiles[t], acc))
            gram = running("centred_gram", (c_in, c_in), lambda t, acc: (tiles[t], total, acc))
            self._shared += [total, gram]
            expanded = [
                run("expand", path, w, (tiles[t], total, gram), t, relu=relu)[0]
                for t in range(live)
            ]
            return (*expanded, *padding)
        read = () if gate is None else (gate,)
        sums = (self._start((c_out,)),) if norm else ()  # the outputs' running sum
        outputs = []
        for t, x in enumerate(tiles[:live]):
            y, *sums = run("conv_rows", conv_path, conv, (x, *read, *sums), t, gated=bool(read))
            outputs.append(y)
        stats = ()
        if norm:
            (total,) = sums
            squares = running("centred_squares", (c_out,), lambda t, acc: (outputs[t], total, acc))
            stats = (total, squares)
            self._shared += [total, squares]
        normalized = [
            run(
                "batch_norm_tile", bn_path, bn, (y, *stats, *residual[t : t + 1]),
                t, relu=relu, site=site,
            )[0]
            for t, y in enumerate(outputs)
        ]  # fmt: skip
        return (*normalized, *padding)

    def _res_block(self, index: int, block: ResBlock, w_block: dict, x: tuple, side: int):
        """The sub-blocks of a SuperResIDWE block: expand, depthwise + SE, [shortcut],
        project (+ residual, ReLU); activations pass between the pieces as tiles."""
        dw, mid, radius = block.dw_channels, se_channels(block.dw_channels), block.kernel // 2
        for j in range(block.layers):
            path = (block_name(index), layer_name(j))
            w = w_block[path[1]]
            stride = block.stride if j == 0 else 1
            out_side = side_after(side, stride)
            p_out = rows_bucket(out_side * out_side)
            tiles = self._tile_count(p_out)
            e = self._pointwise(index, (*path, "expand"), w["expand"], x, side, dw, relu=False)
            w_dw = {"depthwise": w["depthwise"], "se": w["se"]}
            dims = _dims(side, dw, mid, radius)
            outputs = self._apply(
                "depthwise_se", index, path, w_dw, e, dims, stride=stride, p_out=p_out, tiles=tiles
            )
            h, gate = outputs[:tiles], outputs[tiles]
            residual = () if self._zen else x
            if "shortcut" in w and not self._zen:
                if stride == 2:
                    x = self._apply(
                        "subsample", index, path, {}, x, _dims(side), p_out=p_out, tiles=tiles
                    )
                residual = self._pointwise(
                    index, (*path, "shortcut"), w["shortcut"], x, out_side, block.out_channels,
                    relu=False, site=False,
                )  # fmt: skip
            x = self._pointwise(
                index, (*path, "project"), w["project"], h, out_side, block.out_channels,
                gate=gate, residual=residual,
            )  # fmt: skip
            side = out_side
        return x, side

    def _backward(
        self,
        cotangent: jax.Array,
        kinds: frozenset,
        weights: bool = False,
        to_images: bool = False,
        last: bool = True,
        terms: bool = True,
    ) -> tuple[jax.Array | None, dict | None]:
        """Chain the recorded pieces' backwards from the logits' cotangent, summing the
        cotangents of arrays read by several pieces (a sub-block's input feeds its expand
        and its shortcut or residual) inside the backward of the reader run last. Adds the
        gradient terms at `kinds` (computed but dropped without `terms`); returns the
        gradient at the images (with `to_images`, else None) and, with `weights`, the padded
        parameter tree's gradient. Only the backwards whose cotangents reach something
        asked for run: WRCor's SE sites need none below the first SE, so the stem's
        backward at full resolution is skipped. The `last` backward of a forward pass drops
        each piece's record once past it, so that the wide first blocks' backwards do not
        run beside every later block's stored outputs."""
        # every reader of a statistic or a gate adds to a cotangent, the first one to zeros:
        # the tiles' backwards are then one program, not the first apart
        pending: dict[int, jax.Array] = {id(a): self._zeros(a.shape, a.dtype) for a in self._shared}
        logits = self._calls[-1][1].outputs[0]
        images = self._calls[0][1].inputs[0]
        pending[id(logits)] = cotangent
        grads: dict | None = {} if weights else None
        needed = self._needed(kinds, weights, images if to_images else None)
        calls = self._calls if last else list(self._calls)
        while calls:
            block, call = calls.pop()
            cotangents = tuple(self._cotangent(pending, out) for out in call.outputs)
            carried = tuple(
                None if id(array) in self._put else pending.pop(id(array), None)
                for array in call.inputs
            )
            frozen = needed.pop()
            if frozen is None:
                continue
            # passed only when some are: the other calls keep the signatures cached before
            static = call.static | ({"frozen": frozen} if frozen else {})
            d_inputs, piece_terms, d_w = PIECES[call.piece].backward(
                call.w, call.inputs, call.dims, call.outputs, cotangents, carried, kinds=kinds,
                weights=weights, **static,
            )  # fmt: skip
            if terms:
                self._terms.append((block, piece_terms))
            if grads is not None:
                _add_into(_subtree(grads, call.path), jax.device_get(d_w))
            for array, d in zip(call.inputs, d_inputs, strict=True):
                if id(array) not in self._put:  # the zeros put in: dropped
                    pending[id(array)] = d
        return pending[id(images)] if to_images else None, grads

    def _cotangent(self, pending: dict, out: jax.Array) -> jax.Array | None:
        """The summed cotangent at a call's output (None where nothing read it), zeros at a
        tile whose readers were skipped: its producer's backward stays the usual program."""
        cotangent = pending.pop(id(out), None)
        if cotangent is None and id(out) in self._unread:
            return self._blank(out.shape, out.dtype)
        return cotangent

    def _needed(
        self, kinds: frozenset, weights: bool, images: jax.Array | None
    ) -> list[tuple[int, ...] | None]:
        """Per recorded call, None when its backward reaches nothing asked for (the
        weights' gradient, the gradient at `images` (None: not asked; through the calls
        that produced its inputs) or a site of `kinds`, its own or one upstream of it), else
        which of its inputs need no cotangent: those whose cotangent reaches nothing asked
        for (through their producer's inputs or the producer's sites upstream of them).
        For WRCor that is the first depthwise + SE's input and the first project's input
        from it (only its gate reaches the first SE site)."""
        if weights:
            return [()] * len(self._calls)
        reaches = {id(images): True} if images is not None else {}
        needed = []
        for _, call in self._calls:
            piece = PIECES[call.piece]
            feeds = [reaches.get(id(array), False) for array in call.inputs]
            need = any(feeds) or bool(piece.kinds & kinds)
            for k, out in enumerate(call.outputs):
                kinds_k = piece.output_kinds(k, len(call.outputs))
                reaches[id(out)] = any(feeds) or bool(kinds_k & kinds)
            # a running sum's start is differentiated like the sums after it, so that a
            # chain's first backward is the same program as the others
            frozen = tuple(
                i
                for i, array in enumerate(call.inputs)
                if not feeds[i] and id(array) not in self._put
            )
            needed.append(frozen if need else None)
        return needed

    def measure(
        self,
        arch: MBV2Arch,
        params: dict,
        images: jax.Array,
        labels: jax.Array,
        num_classes: int,
        site_sums: bool = True,
        input_jacobian: bool = False,
        loss_grads: bool = False,
        activations: bool = False,
    ) -> dict:
        """One forward pass of `arch` (unpadded parameters, `network.init_params`) on an NHWC
        batch, giving `activations` (naswot's kernel and meco's sum), then a backward per
        cotangent asked for: `site_sums`, the per-(block, kind) |corrcoef| sums
        `capture.site_sums` gives, and `loss_grads`, dL/dtheta in the shapes of `params`,
        both from the loss gradient; `input_jacobian`, d(sum of logits)/d(images). All but
        the sums as NumPy, as `measures` takes them."""
        del num_classes  # the classifier's width says it
        padded = pad_params(params, input_rows(arch))
        images = jnp.asarray(images, jax.tree.leaves(padded)[0].dtype)  # the weights' precision
        out: dict = {}
        kinds = self.kinds if site_sums else frozenset()
        try:
            logits = self._forward(arch, padded, images, kinds, True, activations)
            if activations:
                out["activations"] = _gather_activations(self._acts, logits.shape[0])
            if input_jacobian:
                # the site sums' backward program, its terms dropped: SE sites' terms cost
                # nothing beside a backward, and a compilation per piece key is spared
                shared = kinds if kinds <= frozenset(SE_KINDS) and not loss_grads else frozenset()
                jacobian, _ = self._backward(
                    jnp.ones_like(logits),
                    shared,
                    to_images=True,
                    last=not (site_sums or loss_grads),
                    terms=False,
                )
                out["input_jacobian"] = np.asarray(jacobian)
            if site_sums or loss_grads:
                cotangent = _loss_cotangent(logits, jnp.asarray(labels))
                _, grads = self._backward(cotangent, kinds, weights=loss_grads)
                if site_sums:
                    out["site_sums"] = _gather(self._terms, len(arch.blocks), logits.shape[0])
                if loss_grads:
                    out["loss_grads"] = unpad(grads, params)
            return out
        finally:
            self._forget()

    def site_sums(
        self, arch: MBV2Arch, params: dict, images: jax.Array, labels: jax.Array, num_classes: int
    ) -> SiteSums:
        """The WRCor family's correlation sums alone (see `measure`)."""
        return self.measure(arch, params, images, labels, num_classes)["site_sums"]

    def half_batch_grads(
        self, arch: MBV2Arch, params: dict, images: jax.Array, labels: jax.Array, num_classes: int
    ) -> dict:
        """`loss_grads` on each half of the batch, stacked (ZiCo's two batches)."""
        halves = []
        for part in batch_halves(images.shape[0]):
            batch = (arch, params, images[part], labels[part], num_classes)
            halves.append(self.measure(*batch, site_sums=False, loss_grads=True)["loss_grads"])
        return jax.tree.map(lambda *g: np.stack(g), *halves)

    def synflow_grads(self, arch: MBV2Arch, params: dict, image_shape: Sequence[int]) -> dict:
        """SynFlow's gradient as `measures` takes it: in float64, BatchNorm off, weights
        |theta|, one all-ones image of the batch's image shape, R = sum of the logits;
        dR/dtheta in the shapes of `params`, as NumPy."""
        try:
            with jax.enable_x64(True):
                padded = jax.tree.map(
                    lambda t: np.abs(np.asarray(t, np.float64)),
                    pad_params(params, input_rows(arch)),
                )
                ones = jnp.ones((1, *image_shape[1:]), jnp.float64)
                logits = self._forward(arch, padded, ones, frozenset(), norm=False)
                _, grads = self._backward(jnp.ones_like(logits), frozenset(), weights=True)
                return unpad(grads, params)
        finally:
            self._forget()

    def zen(self, arch: MBV2Arch, params: dict, x: jax.Array, x_mixed: jax.Array) -> tuple:
        """Zen-score's terms as `measures` takes them: on `params` (Gaussian, unpadded) and
        the Gaussian images x and x + 0.01 eps at the architecture's resolution, residual
        links off, BatchNorm in training mode: E ||f(x) - f(x_mixed)||_1 of the pre-pooling
        features and the sum over the BatchNorms of log sqrt(mean batch variance)."""
        padded = pad_params(params, input_rows(arch))
        try:
            self._forward(arch, padded, jnp.asarray(x), frozenset(), True, zen=True)
            clean = self._calls[-1][1].inputs[0]  # the head's input
            log_std = sum(float(v) for acts in jax.device_get(self._acts) for v in acts.values())
            self._forward(arch, padded, jnp.asarray(x_mixed), frozenset(), True, zen=True)
            return float(_l1_distance(clean, self._calls[-1][1].inputs[0])), log_std
        finally:
            self._forget()


def _subtree(tree: dict, path: tuple[str, ...]) -> dict:
    """The dict at `path` in a nested dict, made on the way where missing."""
    for key in path:
        tree = tree.setdefault(key, {})
    return tree


def _add_into(tree: dict, grads: dict) -> None:
    """Add a nested dict of gradients into `tree` (a piece run over tiles adds its tiles')."""
    for name, d in grads.items():
        if isinstance(d, dict):
            _add_into(tree.setdefault(name, {}), d)
        else:
            tree[name] = tree[name] + d if name in tree else d


@jax.jit
def _l1_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean over samples of sum |a - b| (padded entries are 0 on both sides)."""
    return jnp.abs(a - b).reshape(a.shape[0], -1).sum(axis=1).mean()


@jax.jit
def _loss_cotangent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jax.grad(cross_entropy)(logits, labels)


def _gather_activations(acts: list[dict], n: int) -> tuple[np.ndarray, float]:
    """naswot's kernel (the SE sites' Hamming kernels summed) and meco's sum of smallest
    channel-correlation eigenvalues over every other site's first-image ReLU output, cut to
    its real rows and channels."""
    kernel, meco = np.zeros((n, n), np.int64), 0.0
    for piece_acts in jax.device_get(acts):
        for name, value in piece_acts.items():
            if name in SE_SITES:
                kernel += value
                continue
            first, mask = value
            flat, real = first.reshape(-1, first.shape[-1]), mask.reshape(-1, mask.shape[-1])
            meco += _min_channel_eigenvalue(flat[real.any(axis=1)][:, real.any(axis=0)])
    return kernel, meco


def _gather(terms: list[tuple[int, dict]], num_blocks: int, n: int) -> SiteSums:
    sums = np.zeros((num_blocks, len(KINDS), n, n))
    counts = np.zeros((num_blocks, len(KINDS)), np.int64)
    for block, piece_terms in jax.device_get(terms):
        for kind, (total, count) in piece_terms.items():
            sums[block, KINDS.index(kind)] += np.asarray(total, np.float64)
            counts[block, KINDS.index(kind)] += int(count)
    return SiteSums.from_stacked(sums, counts)
