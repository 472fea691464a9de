"""The PyTorch proxies of `wrcor_jax.torch_ref.proxies` on their own: hand-derived counts,
closed forms and invariances that do not need the JAX side."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference needs the optional torch extra")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from wrcor_jax.spaces.nb201 import (  # noqa: E402
    BEST_CIFAR10,
    count_params,
    init_params,
    parse_arch,
    sample_archs,
)
from wrcor_jax.torch_ref import build_network, mbv2, to_flax_params  # noqa: E402
from wrcor_jax.torch_ref.proxies import (  # noqa: E402
    JACOB_COV_K,
    PROXY_NAMES,
    flops,
    grad_norm,
    input_jacobian,
    jacob_cov,
    jacob_cov_score,
    meco,
    meco_map_score,
    meco_modules,
    meco_terms,
    naswot,
    naswot_kernel,
    params,
    pre_gap_features,
    snip,
    synflow,
    synflow_terms,
    torch_proxy_scores,
    zen,
    zen_network,
    zen_terms,
    zico,
    zico_score,
)
from wrcor_jax.torch_ref.proxies import build_network as build_twin  # noqa: E402

BEST = BEST_CIFAR10
NUM_CLASSES = 10
BATCH = 8
SIZE = 16  # 16 x 16 images (the ImageNet16 size) keep every network pass quick
ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
# The only conv reads node 1, which only a none edge feeds: its input is all zeros.
NONE_FED_CONV = "|none~0|+|none~0|nor_conv_3x3~1|+|none~0|none~1|none~2|"
# Node 1 gets only a none edge, so convs C and E read zeros; the cell stays connected.
NONE_FEEDS_CONVS = (
    "|none~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|avg_pool_3x3~2|"
)
ALL_SKIP = (
    "|skip_connect~0|+|skip_connect~0|skip_connect~1|"
    "+|skip_connect~0|skip_connect~1|skip_connect~2|"
)
RANDOM = [np.asarray(ops) for ops in sample_archs(np.random.default_rng(11), 3)]
FLOAT32_MAX = float(np.finfo(np.float32).max)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def weights() -> dict:
    return init_params(42, NUM_CLASSES)


@pytest.fixture(scope="module")
def batch() -> tuple:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, NUM_CLASSES, BATCH).astype(np.int64))
    return images, labels


def _net(arch, weights, dtype=torch.float32):
    return build_network(arch, NUM_CLASSES, weights).to(dtype)


def _no_grads_left(net) -> bool:
    return all(p.grad is None for p in net.parameters())


# --------------------------------------------------------------------------- params, flops


@pytest.mark.parametrize(
    "arch", [BEST, ALL_NONE, NONE_FED_CONV, NONE_FEEDS_CONVS, ALL_SKIP, *RANDOM]
)
def test_params_equal_count_params(arch, weights):
    ops = parse_arch(arch) if isinstance(arch, str) else arch
    assert params(_net(arch, weights)) == count_params(weights, ops)


def test_params_of_the_best_arch():
    # NB201 lists the CIFAR-10 best architecture at 1.073 M parameters.
    assert params(build_network(BEST, NUM_CLASSES)) == 1_073_466


def test_flops_of_the_best_arch_by_hand():
    """MACs per 32 x 32 image, conv and linear only.

    stem: 32*32 positions x 16 out x 3 in x 9                       =     442,368
    a normal cell of the best arch holds four 3x3 convs and one 1x1 (plus a skip):
      HW x C x C x (4*9 + 1); stage 1: 1024*16*16*37 = 9,699,328 per cell; stage 2
      (256 positions, 32 ch) and stage 3 (64 positions, 64 ch) give the same number;
      15 cells                                                    = 145,489,920
    reduction 16->32 (16x16 out): conv_a 256*32*16*9 = 1,179,648, conv_b 256*32*32*9 =
      2,359,296, shortcut 1x1 256*32*16 = 131,072: 3,670,016; reduction 32->64 (8x8 out):
      64*64*32*9 + 64*64*64*9 + 64*64*32 = 3,670,016 as well; both =   7,340,032
    classifier 64 x 10                                             =         640
    total                                                          = 153,272,960
    (NB201 lists this architecture at 153.27 MFLOPs.)
    """
    assert flops(build_network(BEST, NUM_CLASSES), (3, 32, 32)) == 153_272_960


def _flops_by_formula(ops: np.ndarray, size: int, num_classes: int) -> int:
    """The same derivation for any cell: 9 MACs per position and channel pair for a 3x3
    op, 1 for a 1x1, none for skip, pool and none; reduction cells as above."""
    per_pair = 9 * int(np.sum(ops == 3)) + int(np.sum(ops == 2))
    total = size * size * 16 * 3 * 9  # stem
    for stage, channels in enumerate((16, 32, 64)):
        positions = (size >> stage) ** 2
        total += 5 * positions * channels * channels * per_pair
    for c_in, c_out, out_size in ((16, 32, size // 2), (32, 64, size // 4)):
        positions = out_size * out_size
        total += positions * c_out * (c_in * 9 + c_out * 9 + c_in)
    return total + 64 * num_classes


@pytest.mark.parametrize("arch", [ALL_NONE, NONE_FED_CONV, ALL_SKIP, *RANDOM])
@pytest.mark.parametrize("size", [16, 32])
def test_flops_follow_the_hand_formula(arch, size):
    ops = parse_arch(arch) if isinstance(arch, str) else arch
    net = build_network(ops, 100)
    assert flops(net, (3, size, size)) == _flops_by_formula(ops, size, 100)


def test_flops_leave_the_network_as_it_was(weights):
    net = _net(BEST, weights)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flops(net, (3, SIZE, SIZE))
    assert net.training
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


# --------------------------------------------------------------------------- snip, grad_norm


def _conv_linear_weights(net) -> list[tuple[str, torch.Tensor]]:
    """The Conv2d/Linear weights picked by name and rank, not by module type."""
    return [(n, p) for n, p in net.named_parameters() if n.endswith("weight") and p.dim() in (2, 4)]


def test_snip_and_grad_norm_match_a_hand_computation(weights, batch):
    net = _net(BEST, weights)
    images, labels = batch
    chosen = _conv_linear_weights(net)
    assert len(chosen) == 1 + 15 * 5 + 2 * 3 + 1
    logits = net(images)
    grads = torch.autograd.grad(F.cross_entropy(logits, labels), [p for _, p in chosen])
    # The classifier's gradient in closed form: mean over samples of (softmax - onehot) f^T,
    # f the pooled features: the loss is the MEAN cross-entropy.
    with torch.no_grad():
        features = net.global_pooling(net.lastact(_cells(net, images))).flatten(1).double()
        residual = torch.softmax(logits.double(), 1) - F.one_hot(labels, NUM_CLASSES).double()
    np.testing.assert_allclose(
        grads[-1].double().numpy(), (residual.T @ features / BATCH).numpy(), rtol=1e-4, atol=1e-7
    )
    hand_snip = sum(
        np.abs(p.detach().double().numpy() * g.double().numpy()).sum()
        for (_, p), g in zip(chosen, grads, strict=True)
    )
    hand_norm = sum(np.sqrt((g.double().numpy() ** 2).sum()) for g in grads)
    assert snip(net, images, labels) == pytest.approx(hand_snip, rel=1e-12)
    assert grad_norm(net, images, labels) == pytest.approx(hand_norm, rel=1e-12)
    assert _no_grads_left(net)


def _cells(net, images):
    x = net.stem(images)
    for cell in net.cells:
        x = cell(x)
    return x


def test_snip_and_grad_norm_skip_biases(weights, batch):
    """All-none cells: every weight gradient is exactly 0 while the classifier bias's is not."""
    net = _net(ALL_NONE, weights)
    images, labels = batch
    F.cross_entropy(net(images), labels).backward()
    assert net.classifier.bias.grad.abs().sum() > 1e-3
    assert snip(net, images, labels) == 0.0
    assert grad_norm(net, images, labels) == 0.0


def test_snip_sums_magnitudes_not_signed_products(weights, batch):
    net = _net(BEST, weights)
    images, labels = batch
    F.cross_entropy(net(images), labels).backward()
    signed = sum(float((p.detach() * p.grad).sum().abs()) for _, p in _conv_linear_weights(net))
    net.zero_grad(set_to_none=True)
    assert snip(net, images, labels) > 2 * signed


# --------------------------------------------------------------------------- jacob_cov


def test_jacob_cov_score_of_uncorrelated_rows():
    """Rows 2..8 of the 8 x 8 Hadamard matrix: zero mean, orthogonal, so corrcoef = I."""
    hadamard = np.array([[1.0]])
    for _ in range(3):
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    rows = hadamard[1:]
    np.testing.assert_allclose(np.corrcoef(rows), np.eye(7), atol=1e-15)
    one = 1.0 + JACOB_COV_K
    assert jacob_cov_score(rows) == pytest.approx(-7 * (np.log(one) + 1 / one), rel=1e-12)
    # Perfectly correlated rows: eigenvalues 0 and 2, -(log k + 1/k + log(2+k) + 1/(2+k)).
    pair = np.stack([rows[0], 3 * rows[0] + 1])
    k = JACOB_COV_K
    expected = -(np.log(k) + 1 / k + np.log(2 + k) + 1 / (2 + k))
    assert jacob_cov_score(pair) == pytest.approx(expected, rel=1e-6)
    assert np.isnan(jacob_cov_score(np.stack([rows[0], np.zeros(8)])))


def test_input_jacobian_matches_finite_differences(weights, batch):
    """J[i, p] = d(sum of ALL logits)/dx_ip: BatchNorm lets x_i move every sample's logits."""
    net = _net(BEST, weights, torch.float64)
    images = batch[0].double()
    jac = input_jacobian(net, images)
    assert jac.shape == (BATCH, 3 * SIZE * SIZE)
    step = 1e-6
    for sample, flat in [(0, 5), (3, 400), (7, 3 * SIZE * SIZE - 1)]:
        delta = torch.zeros_like(images)
        delta[sample].view(-1)[flat] = step
        with torch.no_grad():
            diff = net(images + delta).sum() - net(images - delta).sum()
        assert float(diff) / (2 * step) == pytest.approx(jac[sample, flat], rel=1e-5, abs=1e-9)
    assert _no_grads_left(net)


def test_jacob_cov_of_a_disconnected_cell_is_nan(weights, batch):
    """All-none cells: the logits do not depend on x, J = 0, corrcoef undefined -> NaN,
    as the reference's try/except reports it."""
    net = _net(ALL_NONE, weights)
    assert not input_jacobian(net, batch[0]).any()
    assert np.isnan(jacob_cov(net, batch[0]))
    assert np.isfinite(jacob_cov(_net(BEST, weights), batch[0]))


# --------------------------------------------------------------------------- synflow


def test_synflow_of_the_best_arch_needs_float64(weights):
    net = _net(BEST, weights)
    score = synflow(net, (3, 32, 32))
    # Finite in float64, yet beyond float32's range: 17 cells of |weights| multiply up.
    assert np.isfinite(score) and score > FLOAT32_MAX
    # The network itself is untouched: float32, BatchNorm present, signed weights.
    assert next(net.parameters()).dtype == torch.float32
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 1 + 15 * 5 + 4 + 1
    assert (net.stem[0].weight < 0).any()
    assert _no_grads_left(net)


def test_synflow_euler_identities(weights):
    """With BatchNorm gone, |weights| and a positive input every ReLU is the identity and the
    network is linear in its input up to the classifier bias b. R - sum b is then degree-1
    homogeneous in the weights of every layer that all paths cross (stem, classifier), so
    each of those layers' terms equals R - sum b (Euler). In a reduction cell
    out = shortcut(x) + conv_b(conv_a(x)): conv_a and conv_b carry the same share, and
    conv_a's plus the shortcut's is the whole R - sum b."""
    net = _net(BEST, weights)
    terms, total = synflow_terms(net, (3, SIZE, SIZE))
    bias = float(net.classifier.bias.detach().abs().double().sum())
    # The bias is ~1e-40 of R here; Euler still pins each term to rounding.
    whole = total - bias
    for name in ("stem.0", "classifier"):
        assert terms[name] == pytest.approx(whole, rel=1e-12)
    for cell in (5, 11):
        a, b = terms[f"cells.{cell}.conv_a.op.1"], terms[f"cells.{cell}.conv_b.op.1"]
        assert a == pytest.approx(b, rel=1e-12)
        assert a + terms[f"cells.{cell}.downsample.1"] == pytest.approx(whole, rel=1e-12)
    assert synflow(net, (3, SIZE, SIZE)) == pytest.approx(sum(terms.values()), rel=1e-15)


def test_synflow_ignores_signs_and_batch_norm(weights):
    net = _net(BEST, weights)
    reference = synflow(net, (3, SIZE, SIZE))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                module.weight.neg_()
            if isinstance(module, nn.BatchNorm2d):
                module.weight.mul_(3.0)
                module.bias.add_(0.5)
    assert synflow(net, (3, SIZE, SIZE)) == reference


def test_synflow_of_all_none_cells_is_zero(weights):
    # Every path to the logits crosses a `none` edge (x * 0): no weight gets a gradient.
    assert synflow(_net(ALL_NONE, weights), (3, SIZE, SIZE)) == 0.0


# --------------------------------------------------------------------------- naswot


def _site_width(conv_ops_per_cell: int, size: int) -> int:
    """Sum of D over NASWOT's sites for 16/32/64-channel stages of size, size/2, size/4.

    Each conv op's input (C x H x W of its stage) twice; each reduction cell's conv_a input
    (the previous stage) and conv_b input (its own stage) twice; the final ReLU's output.
    """
    stage = [16 * size * size, 32 * (size // 2) ** 2, 64 * (size // 4) ** 2]
    normal = 2 * conv_ops_per_cell * 5 * sum(stage)
    reduction = 2 * (stage[0] + stage[1]) + 2 * (stage[1] + stage[2])
    return normal + reduction + stage[2]


def test_naswot_kernel_of_the_best_arch(weights, batch):
    kernel = naswot_kernel(_net(BEST, weights), batch[0])
    width = _site_width(5, SIZE)
    assert width == 377_856  # 1,511,424 / 4: a quarter of the 32 x 32 count
    np.testing.assert_array_equal(np.diag(kernel), np.full(BATCH, width))
    np.testing.assert_array_equal(kernel, kernel.T)
    np.testing.assert_array_equal(kernel, np.round(kernel))
    off = kernel[~np.eye(BATCH, dtype=bool)]
    assert (off < width).all() and (off > width / 4).all()
    assert naswot(_net(BEST, weights), batch[0]) == pytest.approx(
        np.linalg.slogdet(kernel)[1], rel=1e-12
    )


@pytest.mark.parametrize(("arch", "convs"), [(ALL_NONE, 0), (NONE_FED_CONV, 1)])
def test_naswot_counts_all_zero_sites(arch, convs, weights, batch):
    """Zero cells: every site's input is 0, so every code is 0 and K = D_total * ones (rank
    one, log-determinant -inf); the zero sites still count in D_total."""
    net = _net(arch, weights)
    kernel = naswot_kernel(net, batch[0])
    np.testing.assert_array_equal(kernel, np.full((BATCH, BATCH), _site_width(convs, SIZE)))
    assert naswot(net, batch[0]) == -np.inf


# --------------------------------------------------------------------------- zico


def test_zico_score_by_hand():
    # Layer 1: mean|g| = (2, 2), std = (1, 1) -> log 4. Layer 2: equal rows, std 0 -> nothing.
    # Layer 3: entry 0 has std 0 and is skipped; entry 1: mean|g| = 2, std = 2 -> log 1 = 0.
    layers = [np.array([[1.0, -3.0], [3.0, -1.0]]), np.ones((2, 4)), np.array([[5, 0], [5, 4]])]
    assert zico_score(layers) == pytest.approx(np.log(4.0), rel=1e-15)


def test_zico_matches_two_half_batches_by_hand(weights, batch):
    """(|g1| + |g2|) / |g1 - g2| is mean|g| / std for two rows; each half has its own BN
    statistics because it runs alone through the network."""
    net = _net(BEST, weights)
    images, labels = batch
    half = BATCH // 2
    layers = [p for _, p in _conv_linear_weights(net)]
    per_half = []
    for part in (slice(0, half), slice(half, BATCH)):
        loss = F.cross_entropy(net(images[part]), labels[part])
        per_half.append([g.double().numpy().ravel() for g in torch.autograd.grad(loss, layers)])
    expected = 0.0
    for g1, g2 in zip(*per_half, strict=True):
        keep = g1 != g2
        expected += np.log(np.sum((np.abs(g1) + np.abs(g2))[keep] / np.abs(g1 - g2)[keep]))
    assert zico(net, images, labels) == pytest.approx(expected, rel=1e-9)
    assert _no_grads_left(net)


def test_zico_halves(weights, batch):
    net = _net(BEST, weights)
    images, labels = batch
    half = BATCH // 2
    score = zico(net, images, labels)
    swapped = torch.cat([images[half:], images[:half]]), torch.cat([labels[half:], labels[:half]])
    assert zico(net, *swapped) == pytest.approx(score, rel=1e-12)
    # Two identical halves: every std is 0, every layer is skipped.
    twice = torch.cat([images[:half]] * 2), torch.cat([labels[:half]] * 2)
    assert zico(net, *twice) == 0.0


# --------------------------------------------------------------------------- meco


def test_meco_map_score():
    hadamard = np.array([[1.0]])
    for _ in range(4):
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    channels = hadamard[1:5].reshape(4, 4, 4)  # 4 uncorrelated channels of a 4 x 4 map
    assert meco_map_score(channels) == pytest.approx(1.0, abs=1e-12)
    # A constant channel: its NaN row and column become 0, so 0 is an eigenvalue.
    channels[2] = 7.0
    assert meco_map_score(channels) == pytest.approx(0.0, abs=1e-12)
    # Two identical channels: eigenvalue 0 from the rank deficit.
    channels[2] = channels[0]
    assert meco_map_score(channels) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("arch", "maps"),
    [
        # stem + 15 normal cells x (6 non-none edges + output) + 2 x (conv_a, conv_b, output)
        # + final BN-ReLU
        (BEST, 1 + 15 * 7 + 2 * 3 + 1),
        (ALL_NONE, 1 + 15 * 1 + 2 * 3 + 1),
        (NONE_FED_CONV, 1 + 15 * 2 + 2 * 3 + 1),
    ],
)
def test_meco_map_count(arch, maps, weights, batch):
    terms = meco_terms(_net(arch, weights), batch[0])
    assert len(terms) == maps
    values = np.array(list(terms.values()))
    assert (values > -1e-9).all() and (values <= 1 + 1e-9).all()


def test_meco_stem_term_by_hand(weights, batch):
    net = _net(BEST, weights)
    images = batch[0]
    with torch.no_grad():
        conv = F.conv2d(images, net.stem[0].weight, padding=1)
        bn = F.batch_norm(conv, None, None, training=True, eps=1e-5)  # scale 1, bias 0
    hand = meco_map_score(bn[0].double().numpy())
    terms = meco_terms(net, images)
    assert terms["stem"] == pytest.approx(hand, rel=1e-6)
    assert meco(net, images) == pytest.approx(sum(terms.values()), rel=1e-12)
    # Disconnected cells give zero maps: only the stem's term is nonzero.
    none_terms = meco_terms(_net(ALL_NONE, weights), images)
    assert none_terms["stem"] == pytest.approx(hand, rel=1e-6)
    assert all(v == 0.0 for k, v in none_terms.items() if k != "stem")


# --------------------------------------------------------------------------- zen


def _gaussian(arch, seed: int = 0):
    """Zen-NAS's init: conv/linear weights N(0, 1), linear bias 0, BN scale 1 and bias 0."""
    net = build_network(arch, NUM_CLASSES)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
            if isinstance(module, nn.Linear):
                module.bias.zero_()
    return net


def _zen_inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((BATCH, 3, SIZE, SIZE), generator=gen)
    return x, x + 0.01 * torch.randn(x.shape, generator=gen)


def test_zen_terms_by_hand():
    net = _gaussian(BEST)
    x, mixed = _zen_inputs()
    delta, sigmas = zen_terms(net, x, mixed)
    assert len(sigmas) == 1 + 15 * 5 + 2 * 2 + 1  # stem, conv ops, reduction convs, head
    with torch.no_grad():
        stem_in = F.conv2d(x.double(), net.stem[0].weight.double(), padding=1)
        f_x, f_mixed = net.lastact(_cells(net, x)), net.lastact(_cells(net, mixed))
    # The stem BN's sigma: biased batch variance per channel, mean over channels, sqrt.
    stem_var = stem_in.var(dim=(0, 2, 3), unbiased=False).mean()
    assert sigmas[0] == pytest.approx(float(stem_var.sqrt()), rel=1e-6)
    hand_delta = (f_x - f_mixed).double().abs().sum(dim=(1, 2, 3)).mean()
    assert delta == pytest.approx(float(hand_delta), rel=1e-6)
    expected = np.log(delta) + np.sum(np.log(sigmas))
    assert zen(net, x, mixed) == pytest.approx(expected, rel=1e-12)
    # sigma comes from the pass on x alone.
    assert zen_terms(net, x, mixed + 1.0)[1] == sigmas


def test_zen_leaves_out_batch_norms_of_dead_convs():
    """Node 1 gets only a none edge: the two convs reading it see zeros, their BatchNorms a
    constant input (sigma 0), and those 2 x 15 BatchNorms carry no scale: left out."""
    net = _gaussian(NONE_FEEDS_CONVS)
    x, mixed = _zen_inputs()
    delta, sigmas = zen_terms(net, x, mixed)
    assert len(sigmas) == 1 + 15 * 3 + 2 * 2 + 1
    assert sum(s == 0.0 for s in sigmas) == 2 * 15
    score = zen(net, x, mixed)
    assert np.isfinite(score)
    assert score == pytest.approx(np.log(delta) + np.log([s for s in sigmas if s]).sum(), rel=1e-12)


def test_zen_degenerate_cases():
    x, mixed = _zen_inputs()
    assert zen(_gaussian(BEST), x, x) == -np.inf  # delta = 0
    assert zen(_gaussian(ALL_NONE), x, mixed) == -np.inf  # constant features, zero variances
    assert np.isfinite(zen(_gaussian(BEST), x, mixed))


# --------------------------------------------------------------------------- driver


def test_torch_proxy_scores(weights, batch):
    images = batch[0].permute(0, 2, 3, 1).numpy()  # the driver takes NHWC, as JAX holds it
    labels = batch[1].numpy().astype(np.int32)
    names = ["params", "flops", "snip", "naswot"]
    scores = torch_proxy_scores(BEST, weights, images, labels, names, NUM_CLASSES)
    assert list(scores) == names
    net = _net(BEST, weights)
    assert scores["params"] == params(net)
    assert scores["flops"] == flops(net, (3, SIZE, SIZE))
    assert scores["snip"] == pytest.approx(snip(net, *batch), rel=1e-12)
    assert scores["naswot"] == pytest.approx(naswot(net, batch[0]), rel=1e-12)
    # The exact (float64) network: the same counts, the float32 scores within float32 noise.
    exact = torch_proxy_scores(
        BEST, weights, images, labels, names, NUM_CLASSES, dtype=torch.float64
    )
    assert (exact["params"], exact["flops"]) == (scores["params"], scores["flops"])
    assert exact["snip"] == pytest.approx(scores["snip"], rel=1e-3)
    assert exact["naswot"] == pytest.approx(scores["naswot"], rel=1e-4)
    with pytest.raises(ValueError, match="unknown proxy"):
        torch_proxy_scores(BEST, weights, images, labels, ["wrcor"], NUM_CLASSES)
    with pytest.raises(ValueError, match="zen needs"):
        torch_proxy_scores(BEST, weights, images, labels, ["zen"], NUM_CLASSES)
    assert set(PROXY_NAMES) == {
        "snip", "grad_norm", "jacob_cov", "synflow", "naswot",
        "params", "flops", "zico", "meco", "zen",
    }  # fmt: skip


def test_torch_proxy_scores_zen_through_a_flax_tree(weights):
    net = _gaussian(BEST)
    tree = to_flax_params(net, BEST, weights)
    x, mixed = _zen_inputs()
    nhwc = tuple(t.permute(0, 2, 3, 1).numpy() for t in (x, mixed))
    labels = np.zeros(BATCH, np.int32)
    scores = torch_proxy_scores(
        BEST, weights, nhwc[0], labels, ["zen"], NUM_CLASSES, zen_params=tree, zen_inputs=nhwc
    )
    assert scores["zen"] == pytest.approx(zen(net, x, mixed), rel=1e-12)


# --------------------------------------------------------------------------- MobileNetV2 twin

MBV2_ARCH = (
    "SuperConvK3BNRELU(3,8,1,2)SuperResIDWE2K3(8,16,2,8,2)SuperResIDWE6K5(16,16,1,8,1)"
    "SuperConvK1BNRELU(16,16,1,1)@16"
)


@pytest.fixture(scope="module")
def mbv2_net():
    from wrcor_jax.spaces.mbv2.arch import parse
    from wrcor_jax.spaces.mbv2.network import init_params

    arch = parse(MBV2_ARCH)
    return build_twin(arch, NUM_CLASSES, init_params(arch, 42, NUM_CLASSES))


def test_mbv2_naswot_reads_the_se_relu_inputs(mbv2_net, batch):
    """Only the SE's nn.ReLU has "ReLU" in its class name; each site adds its feature count
    to every diagonal entry: sum of dw/4 over the sub-blocks (2 x 16/4 + 48/4)."""
    kernel = naswot_kernel(mbv2_net, batch[0])
    np.testing.assert_array_equal(np.diagonal(kernel), 2 * 4 + 12)


def test_mbv2_meco_reads_every_block_relu(mbv2_net, batch):
    """Two conv layers, three sub-blocks x (expand, depthwise, output), the last conv."""
    assert all(isinstance(m, mbv2.RELU) for _, m in meco_modules(mbv2_net))
    terms = meco_terms(mbv2_net, batch[0])
    assert len(terms) == 2 + 3 * 3 + 1
    assert meco(mbv2_net, batch[0]) == pytest.approx(sum(terms.values()), rel=1e-12)


def test_mbv2_pre_gap_features_are_the_last_block_output(mbv2_net, batch):
    with torch.no_grad():
        x = F.interpolate(batch[0], 16, mode="bilinear", align_corners=False)
        for block in mbv2_net.module_list:
            x = block(x)
    torch.testing.assert_close(pre_gap_features(mbv2_net, batch[0]), x, rtol=0, atol=0)


def test_mbv2_zen_network_has_no_residual_links(batch):
    """Zen-NAS's no_reslink: each sub-block is its body, so the two projection shortcuts
    (conv with bias, BN) are gone and their BatchNorms give no sigma."""
    from wrcor_jax.spaces.mbv2.arch import parse
    from wrcor_jax.spaces.mbv2.measures import zen_params

    arch = parse(MBV2_ARCH)
    gaussian = zen_params(arch, 0, NUM_CLASSES)
    full = build_twin(arch, NUM_CLASSES, gaussian)
    plain = zen_network(arch, NUM_CLASSES, gaussian)
    projections = [m for m in full.modules() if isinstance(m, mbv2.ResBlockProj)]
    shortcut_params = sum(params(m.proj) for m in projections)
    assert len(projections) == 2 and params(plain) == params(full) - shortcut_params
    body, sub = plain.module_list[1].module_list[0], full.module_list[1].module_list[0]
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(body(x), sub(x) - sub.proj(x))
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in full.modules())
    x, mixed = batch[0], batch[0] + 0.01
    assert len(zen_terms(plain, x, mixed)[1]) == batch_norms - len(projections)
