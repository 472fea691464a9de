"""The MobileNetV2-space Flax network against its PyTorch twin: same weights, same batch,
same logits; the bilinear resize against torch's; weight transfer; parameter counts; sites.

Widths are narrow (8-24 channels, far below the search ranges but inside the grammar) and
the batch is 4; what remains is compile time (~1.5 s per arch in float32, ~2 s in float64 on
XLA:CPU), so quick runs check 7 archs in float64 and 3 in float32 (~35 s), `slow` the rest.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch twin needs the optional torch extra")

import torch.nn.functional as F  # noqa: E402

from wrcor_jax.spaces.mbv2.arch import MOBILENET_V2, ConvBlock, ResBlock, parse  # noqa: E402
from wrcor_jax.spaces.mbv2.network import (  # noqa: E402
    MBV2Network,
    count_params,
    init_params,
    param_shapes,
    resize_bilinear,
)
from wrcor_jax.torch_ref.mbv2 import (  # noqa: E402
    block_of,
    build_network,
    load_flax_params,
    to_flax_params,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_CLASSES = 10
BATCH = 4
# float32 logits of the two frameworks differ by rounding alone (float64 agrees to 1.1e-13
# at most). Measured max |JAX - torch| / max |logits| over CASES: 2.6e-5 (case 6, the 9-block
# net, where both sides are 1.1e-4 from the float64 logits), 5e-6..1.1e-5 elsewhere (JAX
# ~1e-6, torch ~8e-6 from float64). Training-mode BatchNorm over few values (the SE's: 4;
# 7 x 7 x 4 at the end of case 6) amplifies rounding. 4x the worst case:
FLOAT32_RTOL = 1e-4
FLOAT64_RTOL = 1e-10

# (architecture, input image size). Together: res-block kernels 3/5/7, expansions 1/2/4/6,
# depths 1 and 6, first sub-blocks with stride 1 and 2, a stride-2 conv stem (and a stride-1
# two-layer one), a 5x5 conv block mid-network, every resolution 192..320, images upsampled,
# downsampled and kept, widths that are not multiples of 8.
CASES = [
    (
        "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE1K3(8,8,1,8,1)SuperResIDWE6K7(8,16,2,8,1)"
        "SuperConvK1BNRELU(16,24,1,1)@192",
        32,
    ),
    (
        "SuperConvK3BNRELU(3,16,2,1)SuperResIDWE2K5(16,8,2,8,1)SuperResIDWE4K3(8,16,1,8,1)"
        "SuperConvK1BNRELU(16,24,1,1)@224",
        32,
    ),
    (
        "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE4K7(8,12,2,8,1)SuperResIDWE1K5(12,16,1,12,1)"
        "SuperConvK1BNRELU(16,16,1,1)@256",
        32,
    ),
    (
        "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE6K5(8,16,2,8,2)SuperResIDWE2K3(16,16,2,8,1)"
        "SuperConvK1BNRELU(16,24,1,1)@288",
        288,
    ),
    (
        "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE2K7(8,16,2,8,1)SuperResIDWE6K3(16,16,2,8,1)"
        "SuperConvK1BNRELU(16,24,1,1)@320",
        32,
    ),
    (
        "SuperConvK3BNRELU(3,8,1,2)SuperResIDWE4K5(8,16,2,8,1)SuperResIDWE1K7(16,16,2,16,1)"
        "SuperConvK1BNRELU(16,16,1,1)@192",
        48,
    ),
    (
        "SuperConvK3BNRELU(3,16,2,1)SuperResIDWE1K3(16,8,1,16,1)SuperResIDWE6K3(8,12,2,8,1)"
        "SuperResIDWE6K5(12,16,2,8,1)SuperResIDWE6K3(16,16,2,8,1)SuperResIDWE4K7(16,24,1,8,1)"
        "SuperResIDWE6K3(24,24,2,8,1)SuperResIDWE2K5(24,24,1,16,1)SuperConvK1BNRELU(24,32,1,1)@224",
        320,
    ),
    (
        "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE6K7(8,16,2,8,6)SuperConvK1BNRELU(16,16,1,1)@320",
        32,
    ),
    (
        "SuperConvK3BNRELU(3,8,2,1)SuperConvK5BNRELU(8,16,2,2)SuperResIDWE2K3(16,16,1,10,2)"
        "SuperConvK1BNRELU(16,8,1,1)@256",
        32,
    ),
    (
        "SuperConvK3BNRELU(3,12,2,1)SuperResIDWE4K5(12,20,2,6,2)SuperResIDWE1K3(20,20,1,12,1)"
        "SuperConvK1BNRELU(20,24,1,1)@288",
        64,
    ),
]
ARCHS = [text for text, _ in CASES]
# Quick runs (`-m "not slow"`) check these; they still cover all of the above. A compile costs
# ~2 s per arch in float64 and ~1.5 s in float32 on XLA:CPU, whatever the widths.
QUICK_FLOAT64 = (0, 1, 2, 3, 6, 7, 8)
QUICK_FLOAT32 = (3, 6, 7)  # same-size input, the 9-block net, depth 6 at 320


def _cases(quick: tuple[int, ...]) -> list:
    return [
        pytest.param(case, marks=() if i in quick else pytest.mark.slow, id=str(i))
        for i, case in enumerate(CASES)
    ]


@functools.cache
def _params(text: str) -> dict:
    return init_params(parse(text), seed=0, num_classes=NUM_CLASSES)


@functools.cache
def _images(size: int) -> np.ndarray:
    return np.random.default_rng(size).standard_normal((BATCH, size, size, 3))


def _flax_logits(text: str, size: int, dtype) -> np.ndarray:
    model = MBV2Network(parse(text), NUM_CLASSES, dtype)
    images = _images(size).astype(dtype)
    return np.asarray(jax.jit(model.apply)({"params": _params(text)}, images))


def _torch_logits(text: str, size: int, dtype: torch.dtype) -> np.ndarray:
    net = build_network(text, NUM_CLASSES, _params(text)).to(dtype)
    images = torch.from_numpy(_images(size)).permute(0, 3, 1, 2).to(dtype)
    with torch.no_grad():
        return net(images).numpy()


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("indices", [range(len(CASES)), QUICK_FLOAT64], ids=["all", "quick"])
def test_cases_cover_the_grammar(indices):
    archs = [parse(ARCHS[i]) for i in indices]
    res = [b for arch in archs for b in arch.blocks if isinstance(b, ResBlock)]
    assert {b.kernel for b in res} == {3, 5, 7}
    assert {b.expansion for b in res} == {1, 2, 4, 6}
    assert {b.layers for b in res} >= {1, 6} and {b.stride for b in res} == {1, 2}
    assert any(isinstance(a.blocks[0], ConvBlock) and a.blocks[0].stride == 2 for a in archs)
    assert {arch.resolution for arch in archs} == {192, 224, 256, 288, 320}
    sizes = [(CASES[i][1], arch.resolution) for i, arch in zip(indices, archs, strict=True)]
    assert {np.sign(r - s) for s, r in sizes} == {-1, 0, 1}  # up, down, same


@pytest.mark.parametrize("case", _cases(QUICK_FLOAT64))
def test_logits_match_torch_in_float64(case):
    """The same maths: 1e-10 of the logits' scale (measured: 6e-15 to 1.1e-13)."""
    with jax.enable_x64(True):
        ours = _flax_logits(*case, jnp.float64)
    assert ours.dtype == np.float64
    assert _relative_error(ours, _torch_logits(*case, torch.float64)) <= FLOAT64_RTOL


@pytest.mark.parametrize("case", _cases(QUICK_FLOAT32))
def test_logits_match_torch_in_float32(case):
    ours = _flax_logits(*case, jnp.float32)
    assert ours.dtype == np.float32
    assert _relative_error(ours, _torch_logits(*case, torch.float32)) <= FLOAT32_RTOL


@pytest.mark.parametrize(
    ("size_in", "size_out"),
    [(32, 224), (32, 320), (320, 224), (64, 48), (224, 192), (17, 50), (288, 288)],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resize_matches_torch_interpolate(size_in, size_out, dtype):
    """Torch's default bilinear (align_corners=False, antialias=False, taps clamped at the
    edges). float32 agrees to the last bit or one ulp (XLA may fuse the sums differently);
    float64 to ~1e-14, its source coordinates being rounded twice here, once (fused) in torch."""
    images = np.random.default_rng(size_in).standard_normal((2, size_in, size_in, 3))
    images = images.astype(dtype)
    expected = F.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2), size_out, mode="bilinear"
    ).permute(0, 2, 3, 1)
    with jax.enable_x64(dtype == np.float64):
        ours = np.asarray(jax.jit(resize_bilinear, static_argnums=1)(images, size_out))
    assert ours.dtype == dtype and ours.shape == (2, size_out, size_out, 3)
    tolerance = (2 * np.finfo(np.float32).eps if dtype == np.float32 else 1e-13) * 4  # |x| < 4
    np.testing.assert_allclose(ours, expected.numpy(), rtol=0, atol=tolerance)


def test_downsampling_reads_the_two_nearest_pixels_only():
    """No antialiasing: 4 -> 2 takes the mean of the two middle pixels of each pair of rows
    and columns (source coordinate 2d + 0.5), not of the whole 2 x 2 window's surroundings."""
    image = np.arange(16.0, dtype=np.float32).reshape(1, 4, 4, 1)
    out = np.asarray(resize_bilinear(image, 2))[0, :, :, 0]
    np.testing.assert_array_equal(out, [[2.5, 4.5], [10.5, 12.5]])


def test_weight_round_trip():
    text = ARCHS[6]
    params = _params(text)
    net = build_network(text, NUM_CLASSES, params)
    back = to_flax_params(net, param_shapes(parse(text), NUM_CLASSES))
    jax.tree.map(np.testing.assert_array_equal, back, params)
    fresh = load_flax_params(build_network(text, NUM_CLASSES), back)
    for a, b in zip(fresh.state_dict().values(), net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loading_checks_the_architecture():
    with pytest.raises(ValueError, match="does not fit"):
        build_network(ARCHS[0], NUM_CLASSES, _params(ARCHS[7]))  # other depths
    with pytest.raises(ValueError, match="shape"):
        build_network(ARCHS[0], NUM_CLASSES, _params(ARCHS[1]))  # same layout, other widths


@pytest.mark.parametrize("text", ARCHS, ids=range(len(ARCHS)))
def test_parameter_count_matches_torch(text):
    net = build_network(text, NUM_CLASSES)
    assert count_params(parse(text), NUM_CLASSES) == sum(p.numel() for p in net.parameters())


def test_mobilenetv2_parameter_count():
    """SPEC 8's MobileNetV2 with SE: 4,465,880 parameters, as the reference's own network
    counts them (`sum(p.numel())`, measured on the paper's code)."""
    assert count_params(parse(MOBILENET_V2)) == 4_465_880


def test_initialisation_follows_torch_defaults():
    """Kernels and the biases of the shortcut conv and the classifier ~ U(+-1/sqrt(fan_in)),
    fan_in = in/groups x k x k; BatchNorm scale 1, bias 0."""
    params = _params(ARCHS[7])
    layer = params["block_01"]["layer_0"]
    depthwise = layer["depthwise"]["kernel"]  # 7 x 7 x 1 x 48: fan_in 49
    assert depthwise.shape == (7, 7, 1, 48)
    assert 0.9 / 7 < np.abs(depthwise).max() <= 1 / 7
    bias = layer["shortcut"]["conv"]["bias"]  # fan_in 8
    assert np.abs(bias).max() <= 1 / np.sqrt(8) and np.abs(bias).min() > 0
    assert np.all(layer["depthwise"]["scale"] == 1) and not layer["depthwise"]["bias"].any()
    assert not layer["shortcut"]["bn"]["bias"].any()
    assert np.abs(params["classifier"]["bias"]).max() <= 1 / 4  # fan_in 16


def test_sites_and_the_se_relu_inputs():
    """A `relu_in` site at every ReLU's input, named by block, layer and stage; the SE's sites
    see what the twin's `nn.ReLU` modules (the reference's hooked ReLUs) see."""
    text = "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE2K3(8,8,2,8,2)SuperConvK1BNRELU(8,16,1,1)@32"
    model = MBV2Network(parse(text), NUM_CLASSES, jnp.float64)
    with jax.enable_x64(True):
        apply = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
        _, state = apply({"params": _params(text)}, _images(32))
    sites = state["intermediates"]
    paths = {
        "/".join(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_leaves_with_path(sites)
    }
    expected = {"block_00/layer_0/relu_in", "block_02/layer_0/relu_in"}
    for layer in ("layer_0", "layer_1"):
        expected |= {f"block_01/{layer}/{stage}relu_in" for stage in ("", "expand/", "depthwise/")}
        expected |= {f"block_01/{layer}/se/relu_in"}
    assert paths == expected
    ours = [sites["block_01"][layer]["se"]["relu_in"][0] for layer in ("layer_0", "layer_1")]
    net = build_network(text, NUM_CLASSES, _params(text)).double()
    seen = []
    for name, module in net.named_modules():
        if "ReLU" in type(module).__name__:  # the reference's hook rule
            assert block_of(name) == 1 and name.endswith(".netblock.3")
            module.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    with torch.no_grad():
        net(torch.from_numpy(_images(32)).permute(0, 3, 1, 2))
    assert len(seen) == len(ours) == 2
    for mine, theirs in zip(ours, seen, strict=True):
        np.testing.assert_allclose(
            np.asarray(mine), theirs.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-12
        )
