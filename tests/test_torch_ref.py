"""The PyTorch reference: network parity with Flax, weight transfer, hook sites and counts."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference needs the optional torch extra")

from wrcor_jax.spaces.nb201 import (  # noqa: E402
    BEST_CIFAR10,
    CONV_OPS,
    MEDIAN_CIFAR10,
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
    torch_scores,
    torch_site_terms,
    wrcor,
)

BEST, MEDIAN = BEST_CIFAR10, MEDIAN_CIFAR10
NUM_CLASSES = 10
BATCH = 16
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


def _conv_count(arch: str) -> int:
    return sum(int(op) in CONV_OPS for op in parse_arch(arch))


def _reference_terms(arch: str) -> int:
    """SPEC 3a: 4 per conv op in 15 normal cells, 4 per conv of the 2 reduction cells, 2 final."""
    return 4 * _conv_count(arch) * 15 + 2 * 2 * 4 + 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


@pytest.mark.slow
@pytest.mark.parametrize("arch", PARITY_ARCHS)
def test_logits_match_flax(arch, params, batch, torch_batch, flax_logits):
    # float32 noise, not a difference in the maths (see the float64 test): the all-3x3 arch
    # is 1.7e-5 apart (each side ~1.2e-5 from the float64 logits), the others <= 3.5e-6.
    expected = np.asarray(flax_logits(params, batch[0], parse_arch(arch)))
    with torch.no_grad():
        logits = build_network(arch, NUM_CLASSES, params)(torch_batch[0]).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=5e-5)


@pytest.mark.slow
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


# --------------------------------------------------------------------------- hook sites


@pytest.fixture(scope="module")
def best_terms(params, torch_batch) -> tuple[list, list]:
    net = build_network(BEST, NUM_CLASSES, params)
    return (
        torch_site_terms(net, *torch_batch, site_set="reference"),
        torch_site_terms(net, *torch_batch, site_set="clean"),
    )


def test_best_arch_reference_term_count(best_terms):
    reference, _ = best_terms
    assert len(reference) == _reference_terms(BEST) == 318
    kinds = Counter(kind for _, kind, _ in reference)
    assert kinds == {"relu_in": 158, "grad_relu_in": 80, "grad_bn_in": 79, "relu_out": 1}
    per_block = Counter(block for block, _, _ in reference)
    assert per_block == {**{i: 20 for i in range(17) if i not in (5, 11)}, 5: 8, 11: 8, 17: 2}
    assert sorted(kind for block, kind, _ in reference if block == 17) == [
        "grad_relu_in",
        "relu_out",
    ]


def test_reference_sites_mean_what_spec_3a_says(best_terms):
    reference, clean = best_terms
    assert len(clean) == 2 * (5 * 15 + 4) + 2
    # Each conv op's input appears twice (nn.ReLU's and ReLUConvBN's forward hooks).
    ref_inputs = [r for _, kind, r in reference if kind == "relu_in"]
    clean_inputs = [r for _, kind, r in clean if kind == "relu_in"]
    for twice, once in zip(ref_inputs[::2], clean_inputs[:-1], strict=True):
        np.testing.assert_array_equal(twice, once)
    np.testing.assert_array_equal(ref_inputs[0], ref_inputs[1])
    # The old-style nn.ReLU backward hook = the gradient at the ReLU's input along its path.
    ref_grads = [r for _, kind, r in reference if kind == "grad_relu_in"]
    clean_grads = [r for _, kind, r in clean if kind == "grad_relu_in"]
    for a, b in zip(ref_grads, clean_grads, strict=True):
        np.testing.assert_array_equal(a, b)
    # The in-place final ReLU's forward hook sees its output: relu of the clean input.
    (ref_out,) = [r for _, kind, r in reference if kind == "relu_out"]
    np.testing.assert_array_equal(ref_out, np.maximum(clean_inputs[-1], 0))


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_relu_conv_bn_backward_hook_is_the_conv_output_gradient(params, torch_batch):
    net = build_network(MEDIAN, NUM_CLASSES, params)
    conv_outputs = []

    def keep(module, inputs, output):
        output.retain_grad()
        conv_outputs.append(output)

    convs = [m.op[1] for m in net.modules() if type(m).__name__ == "ReLUConvBN"]
    handles = [conv.register_forward_hook(keep) for conv in convs]
    terms = torch_site_terms(net, *torch_batch)
    for handle in handles:
        handle.remove()
    hooked = Counter(_digest(r) for _, kind, r in terms if kind == "grad_bn_in")
    expected = Counter(
        _digest(out.grad.reshape(BATCH, -1).double().numpy()) for out in conv_outputs
    )
    assert len(conv_outputs) == 3 * 15 + 4
    assert hooked == expected


@pytest.mark.parametrize(
    ("arch", "contributed", "attempted"),
    [
        (MEDIAN, 198, 198),
        (ALL_NONE, 0, 18),
        # Only cell 0's three conv-op inputs vary (each counted twice); every gradient is 0.
        (DISCONNECTED, 6, _reference_terms(DISCONNECTED)),
    ],
)
def test_term_counts_and_skipped_terms(arch, contributed, attempted, params, torch_batch):
    result = wrcor(build_network(arch, NUM_CLASSES, params), *torch_batch)
    assert (result.contributed, result.attempted) == (contributed, attempted)
    assert attempted == _reference_terms(arch)
    assert (result.score == -np.inf) == (contributed == 0)


def test_scores_match_their_definition(params, batch, torch_batch):
    arch = "|nor_conv_1x1~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"
    scores = torch_scores(arch, params, *batch, NUM_CLASSES)
    net = build_network(arch, NUM_CLASSES, params)

    def logdet(site_set: str, weighted: bool, forward_only: bool) -> float:
        k = np.zeros((BATCH, BATCH))
        for block, kind, response in torch_site_terms(net, *torch_batch, site_set=site_set):
            if forward_only and kind.startswith("grad_"):
                continue
            k += (2.0**block if weighted else 1.0) * np.abs(np.corrcoef(response))
        return np.linalg.slogdet(k)[1]

    assert scores["terms"] == scores["terms_attempted"] == _reference_terms(arch) == 78
    assert scores["terms_clean"] == 2 * (15 + 4) + 2
    assert scores["wrcor"] == pytest.approx(logdet("reference", True, False), rel=1e-12)
    assert scores["wrcor_clean"] == pytest.approx(logdet("clean", True, False), rel=1e-12)
    assert scores["act_cor"] == pytest.approx(logdet("reference", False, True), rel=1e-12)
    assert scores["act_grad_cor"] == pytest.approx(logdet("reference", False, False), rel=1e-12)


def test_unknown_site_set_is_rejected(params, torch_batch):
    with pytest.raises(ValueError, match="unknown site set"):
        wrcor(build_network(MEDIAN, NUM_CLASSES, params), *torch_batch, site_set="all")
