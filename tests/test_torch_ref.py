"""The PyTorch reference: network parity with Flax and weight transfer."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference needs the optional torch extra")

from wrcor_jax.spaces.nb201 import (  # noqa: E402
    NB201Network,
    arch_string,
    init_params,
    parse_arch,
    sample_archs,
    used_params,
)
from wrcor_jax.torch_ref import (  # noqa: E402
    build_network,
    load_flax_params,
    to_flax_params,
)

NUM_CLASSES = 10
BATCH = 16
BEST = (
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|"
    "+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
)
# The CIFAR-10 median-accuracy architecture (NATS-Bench index 12400), three conv ops.
MEDIAN = (
    "|avg_pool_3x3~0|+|nor_conv_3x3~0|skip_connect~1|"
    "+|nor_conv_1x1~0|avg_pool_3x3~1|nor_conv_1x1~2|"
)
ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
# Every edge into node 3 is none: each cell outputs zeros; only cell 0's convs see data.
DISCONNECTED = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|none~0|none~1|none~2|"
PARITY_ARCHS = [
    BEST,
    MEDIAN,
    ALL_NONE,
    DISCONNECTED,
    "|none~0|+|none~0|none~1|+|nor_conv_3x3~0|none~1|none~2|",
    "|nor_conv_1x1~0|+|none~0|none~1|+|none~0|none~1|nor_conv_3x3~2|",
    "|none~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|none~1|none~2|",
    "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|",
    "|avg_pool_3x3~0|+|avg_pool_3x3~0|avg_pool_3x3~1|+|avg_pool_3x3~0|avg_pool_3x3~1|avg_pool_3x3~2|",
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|",
] + [arch_string(ops) for ops in sample_archs(np.random.default_rng(7), 12)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # With other jobs on the 2 CPUs, torch's OpenMP pool ran ~18x slower at 2 threads.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def params() -> dict:
    return init_params(42, NUM_CLASSES)


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, 32, 32, 3)).astype(np.float32)
    return images, rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)


@pytest.fixture(scope="module")
def torch_batch(batch) -> tuple:
    images, labels = batch
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(
        labels.astype(np.int64)
    )


@pytest.fixture(scope="module")
def flax_logits():
    return jax.jit(lambda p, x, ops: NB201Network(NUM_CLASSES).apply({"params": p}, x, ops))


# --------------------------------------------------------------------------- network


def test_importing_the_package_does_not_import_torch():
    code = "import sys, wrcor_jax, wrcor_jax.spaces.nb201; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", PARITY_ARCHS)
def test_logits_match_flax(arch, params, batch, torch_batch, flax_logits):
    # float32 noise, not a difference in the maths (see the float64 test): the all-3x3 arch
    # is 1.7e-5 apart (each side ~1.2e-5 from the float64 logits), the others <= 3.5e-6.
    expected = np.asarray(flax_logits(params, batch[0], parse_arch(arch)))
    with torch.no_grad():
        logits = build_network(arch, NUM_CLASSES, params)(torch_batch[0]).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=5e-5)


@pytest.mark.parametrize("arch", PARITY_ARCHS)
def test_logits_match_flax_in_float64(arch, params, batch, flax_logits):
    """The same network to 1e-10; 16 x 16 images (the ImageNet16 size) keep it quick."""
    images = batch[0][:, ::2, ::2, :].astype(np.float64)
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda leaf: leaf.astype(np.float64), params)
        expected = np.asarray(flax_logits(params64, images, parse_arch(arch)))
    assert expected.dtype == np.float64
    net = build_network(arch, NUM_CLASSES, params).double()
    with torch.no_grad():
        logits = net(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-10)


def test_only_the_chosen_ops_exist(params):
    net = build_network(MEDIAN, NUM_CLASSES)
    convs = sum(type(m).__name__ == "ReLUConvBN" for m in net.modules())
    assert convs == 3 * 15 + 2 * 2
    zeros = build_network(ALL_NONE, NUM_CLASSES)
    assert sum(type(m).__name__ == "Zero" for m in zeros.modules()) == 6 * 15


def test_weight_round_trip(params):
    net = build_network(BEST, NUM_CLASSES, params)
    template = jax.tree.map(np.zeros_like, params)
    back = to_flax_params(net, BEST, template)
    ops = parse_arch(BEST)
    jax.tree.map(np.testing.assert_array_equal, used_params(back, ops), used_params(params, ops))
    # Unused leaves keep the template's values, and the template itself is untouched.
    assert not back["cell_00"]["edge_3_2"]["nor_conv_3x3"]["kernel"].any()
    assert not any(leaf.any() for leaf in jax.tree.leaves(template))
    fresh = load_flax_params(build_network(BEST, NUM_CLASSES), back, BEST)
    for a, b in zip(fresh.state_dict().values(), net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loading_checks_the_architecture(params):
    net = build_network(BEST, NUM_CLASSES)
    with pytest.raises(ValueError, match="built for ops"):
        load_flax_params(net, params, MEDIAN)
