"""experiments/timing_vs_pytorch.py at toy size: the workers run in-process on two
architectures at batch 8 (mbv2: tiny ones, the sampled ones are up to 320 px), the summary's
ratios and FLOP floor, the FLOP counts, the merge of a row run as two processes, the table,
and argument checks; NB201's table keeps its columns. The paper's code is timed too when
ZSNAS_WRCOR names a checkout of kunjing96/ZSNAS-WRCor."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
from conftest import SAMPLE, require

from wrcor_jax.benchmarks.machine import conv_flops_per_s, gram_flops_per_s
from wrcor_jax.spaces.mbv2.arch import parse
from wrcor_jax.spaces.mbv2.cost import describe
from wrcor_jax.spaces.nb201 import parse_arch

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
TINY = (
    "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE2K3(8,16,2,8,1)SuperConvK1BNRELU(16,16,1,1)@32",
    "SuperConvK3BNRELU(3,16,1,1)SuperResIDWE2K5(16,16,2,8,2)SuperConvK1BNRELU(16,24,1,1)@32",
)
NB201_TWO = (  # one conv op each, cheap to score
    "|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|none~1|none~2|",
    "|none~0|+|nor_conv_1x1~0|none~1|+|skip_connect~0|none~1|avg_pool_3x3~2|",
)
TRIO = "synflow,jacob_cov,wrcor"
PAPER_CODE = os.environ.get("ZSNAS_WRCOR")


@pytest.fixture(scope="module")
def timing():
    spec = importlib.util.spec_from_file_location("timing", EXPERIMENTS / "timing_vs_pytorch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_worker(timing, tmp_path, monkeypatch):
    """Run one implementation in this process on two archs of `space` (mbv2: the tiny
    ones); its raw result."""

    def run(name: str, proxies: str, *extra: str, space: str = "mbv2") -> dict:
        archs = [parse(text) for text in TINY] if space == "mbv2" else list(NB201_TWO)
        monkeypatch.setattr(timing, "_archs", lambda args, name: archs)
        out = tmp_path / f"{name}.json"
        argv = ["--space", space, "--proxies", proxies, "--batch-size", "8", "--json", "x"]
        argv += ["--data", str(require(SAMPLE)), "--torch-threads", "1", *extra]
        timing._run_worker(timing._parse_args([*argv, "--worker", name, "--worker-out", str(out)]))
        raw = json.loads(out.read_text())
        assert raw["status"] == "ok" and len(raw["scores"]) == 2 and len(raw["steady_s"]) == 1
        return raw

    return run


def test_torch_rows_score_every_proxy(run_worker, timing):
    eager = run_worker("torch_eager", TRIO)
    assert all(len(row) == 3 for row in eager["scores"])
    if PAPER_CODE:  # the same weights through the paper's own code: the same scores
        paper = run_worker("paper_code", TRIO, "--reference-code", PAPER_CODE)
        for ours, theirs in zip(eager["scores"], paper["scores"], strict=True):
            assert ours == pytest.approx(theirs, rel=1e-9)


@pytest.mark.skipif(not PAPER_CODE, reason="ZSNAS_WRCOR (checkout) not set")
def test_nb201_paper_code_scores_as_our_twin(run_worker, timing):
    """Every proxy both have, the paper's NB201 network with our weights: our twin's scores
    (snip and grad_norm to float32 summation order)."""
    proxies = ",".join(timing.NB201_PROXIES)
    eager = run_worker("torch_eager", proxies, space="nb201")
    paper = run_worker("paper_code", proxies, "--reference-code", PAPER_CODE, space="nb201")
    for ours, theirs in zip(eager["scores"], paper["scores"], strict=True):
        assert ours == pytest.approx(theirs, rel=1e-6)
    row = timing._summarise(paper, {"median_s": 1.0, **eager}, tuple(proxies.split(",")))
    assert row["wrcor_max_rel_diff_vs_torch_eager"] < 1e-12


def test_nb201_proxies_are_the_papers(timing):
    from wrcor_jax.torch_ref.paper_code import PAPER_MEASURES

    assert set(timing.NB201_PROXIES) == set(PAPER_MEASURES)


@pytest.mark.slow  # 58 s at load 7 on 2 cores: the engine compiles for two archs
def test_jax_row_counts_compiles_and_agrees_with_torch(run_worker, timing):
    jax_raw = run_worker("jax", "wrcor", "--no-compile-cache")  # a warm cache would load them
    eager = run_worker("torch_eager", "wrcor")
    assert jax_raw["compiles"] > 0
    row = timing._summarise(jax_raw, {"median_s": 1.0, **eager}, ("wrcor",))
    assert row["wrcor_max_rel_diff_vs_torch_eager"] < 1e-3
    warm = run_worker("jax", "wrcor", "--warm")  # each arch scored once, untimed, first
    assert warm["scores"] == jax_raw["scores"]


def test_summary_ratios_and_floor(timing):
    def raw(name: str, steady: list[float]) -> dict:
        return {"name": name, "status": "ok", "first_call_s": 9.0, "steady_s": steady,
                "timed": [1, 2], "scores": [[1.0, 2.0]] * (1 + len(steady)),
                "peak_rss_mb": 1.0}  # fmt: skip

    eager, paper, jax_raw = (
        raw("torch_eager", [2.0] * 2),
        raw("paper_code", [4.0] * 2),
        raw("jax", [1.0] * 2),
    )
    baseline = {"median_s": 2.0, **eager}
    floors = [9.0, 0.5, 0.5, 9.0]
    row = timing._summarise(jax_raw, baseline, ("wrcor", "synflow"), paper, floors)
    assert (row["ratio_vs_torch_eager"], row["ratio_vs_paper_code"]) == (2.0, 4.0)
    assert (row["floor_median_s"], row["x_floor"]) == (0.5, 2.0)  # the timed archs 1 and 2
    assert row["wrcor_max_rel_diff_vs_torch_eager"] == row["synflow_max_rel_diff_vs_torch_eager"]
    table = timing.markdown_table([row], ("wrcor", "synflow")).splitlines()
    assert (
        "| x torch eager | x paper code | FLOP floor s/arch | x floor | WRCor max rel diff |"
        in (table[0])
    )
    assert table[0].endswith("| synflow max rel diff | status |")


def test_nb201_table_keeps_its_columns(timing):
    row = {"name": "torch_eager", "archs": 2, "ratio_vs_torch_eager": 1.0}
    assert timing.markdown_table([row]).splitlines()[0] == (
        "| implementation | archs | first call s | compiles | median s/arch | p90 s/arch |"
        " archs/s | peak RSS MB | x torch eager | WRCor max rel diff | status |"
    )


def test_mbv2_floor_counts_batch_passes_and_synflow_image(timing):
    argv = ["--space", "mbv2", "--proxies", TRIO, "--batch-size", "8", "--num-archs", "2"]
    args = timing._parse_args([*argv, "--json", "x"])
    archs = timing._archs(args, None)
    measurements = {"site_sums", "input_jacobian", "synflow_grads"}
    for arch in archs:  # forward + data backward for each batch measurement, 3 for synflow
        flops = timing._mbv2_flops(arch, 8, measurements)
        assert flops == {"matmul": 2 * describe(arch, 10).flops * (2 * 8 * 2 + 3)}
        assert describe(arch, 1000).flops <= 600_000_000


def test_archs_file_replaces_the_sample(timing, tmp_path):
    """`--archs` scores a file's archs (a search's, say) in its order, in either space; a
    line of the other space, or no arch at all, is a one-line argument error."""
    path = tmp_path / "archs.txt"
    path.write_text("# evaluated by a search\n" + "\n".join(TINY) + "\n\n")
    args = timing._parse_args(["--space", "mbv2", "--archs", str(path), "--json", "x"])
    assert args.num_archs == 2 and timing._archs(args, None) == [parse(t) for t in TINY]
    path.write_text(NB201_TWO[1])
    args = timing._parse_args(["--archs", str(path), "--json", "x"])
    assert timing._archs(args, None) == [NB201_TWO[1]]
    for text in (TINY[0], "# nothing"):
        path.write_text(text)
        with pytest.raises(SystemExit):
            timing._parse_args(["--archs", str(path), "--json", "x"])
    with pytest.raises(SystemExit):  # both a file and a sample size
        timing._parse_args(["--archs", str(path), "--num-archs", "3", "--json", "x"])


def test_nb201_floor_hand_count(timing):
    """One conv 3x3 and one conv 1x1 per cell (reading nodes 0 and 2), batch 2, WRCor."""
    ops = parse_arch("|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|nor_conv_1x1~2|")
    b = 2
    cell = 32 * 32 * 16 * 16 * (9 + 1)  # multiply-adds per image, the same at every stage
    reduction = 16 * 16 * 32 * (16 * 9 + 32 * 9 + 16)  # conv_a, conv_b, shortcut; both cells
    stem, classifier = 32 * 32 * 16 * 3 * 9, 64 * 10
    # 2 FLOPs a multiply-add, forward + data-gradient backward, the stem's forward alone
    assert timing._nb201_flops(ops, b, {"site_sums"}) == {
        "conv_16": 2 * b * (stem + 2 * 5 * cell),
        "conv_32": 2 * b * 2 * (reduction + 5 * cell),
        "conv_64": 2 * b * 2 * (reduction + 5 * cell + classifier),
        # per normal cell nodes 0 and 2 read, two gradients per conv op: 6 responses of
        # 16,384, 8,192, 4,096 features by stage; per reduction cell 2 responses at its
        # input, 4 at its output; the final ReLU's two responses
        "gram": 2
        * b**2
        * (5 * 6 * (16384 + 8192 + 4096) + 2 * 16384 + 6 * 8192 + 4 * 4096 + 2 * 4096),
    }
    jacobian = timing._nb201_flops(ops, b, {"input_jacobian"})
    assert jacobian["gram"] == 2 * b**2 * 32 * 32 * 3
    assert jacobian["conv_16"] == 2 * b * 2 * (stem + 5 * cell)  # the stem's backward too
    synflow = timing._nb201_flops(ops, b, {"synflow_grads"})
    assert synflow["conv_32"] == 2 * 3 * (reduction + 5 * cell) and synflow["gram"] == 0


def test_nb201_floor_orders_archs(timing):
    def conv(arch: str) -> int:
        flops = timing._nb201_flops(parse_arch(arch), 8, {"site_sums"})
        return sum(value for kind, value in flops.items() if kind.startswith("conv"))

    none, skip = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|", "skip_connect"
    conv3 = none.replace("none", "nor_conv_3x3")
    assert (
        conv(none) == conv(none.replace("none", skip)) < conv(none.replace("none", "nor_conv_1x1"))
    )
    assert conv(none.replace("none", "nor_conv_1x1")) < conv(conv3)
    assert (
        timing._nb201_flops(parse_arch(none), 8, {"site_sums"})["gram"]
        < (timing._nb201_flops(parse_arch(conv3), 8, {"site_sums"})["gram"])
    )


def test_rates_are_measured():
    assert conv_flops_per_s(2, 8, 4, repeats=1) > 0 and gram_flops_per_s(4, 32, repeats=1) > 0


def test_two_processes_merge_at_their_aggregate_rate(timing, monkeypatch):
    def spawn(args, name, extra):
        index = int(extra[1].split("/")[0])
        return {"name": name, "status": "ok", "first_call_s": 5.0 + index,
                "steady_s": [2.0 + index], "timed": [1 + 2 * index], "process_s": 9.0,
                "scores": [[float(2 * index)], [float(2 * index + 1)]],
                "peak_rss_mb": 100.0, "extra": {"torch_threads": 1}}  # fmt: skip

    monkeypatch.setattr(timing, "_spawn", spawn)
    merged = timing._spawn_processes(None, "paper_code_2proc", 2)
    assert merged["steady_s"] == [1.0, 1.5] and merged["timed"] == [1, 3]
    assert merged["scores"] == [[0.0], [1.0], [2.0], [3.0]]
    assert (merged["first_call_s"], merged["peak_rss_mb"]) == (6.0, 200.0)
    assert merged["extra"] == {"torch_threads": 1, "processes": 2}
    row = timing._summarise(merged, None, ("wrcor",), None, [9.0, 0.5, 9.0, 1.5])
    assert row["archs_per_s"] == 0.8 and row["floor_median_s"] == 1.0


def test_shards_cover_the_sample(timing):
    args = timing._parse_args(["--json", "x", "--num-archs", "5"])
    parts = []
    for index in range(2):
        args.shard = (index, 2)
        parts += timing._archs(args, "paper_code_2proc")
    args.shard = None
    assert parts == timing._archs(args, None)


def test_max_rel_diff_on_non_finite(timing):
    nan, inf = float("nan"), float("inf")
    assert timing._max_rel_diff([nan, 1.1], [nan, 1.0]) == pytest.approx(0.1)
    assert timing._max_rel_diff([-inf], [-inf]) == 0.0
    assert timing._max_rel_diff([1.0], [-inf]) == "disagree on -inf"
    assert timing._max_rel_diff([nan], [1.0]) == "disagree on nan"


def test_arguments(timing, capsys):
    base = ["--json", "x", "--space", "mbv2"]
    assert timing._parse_args(base).names == ["torch_eager", "jax"]  # no checkout given
    assert timing._parse_args(base).torch_device == "cpu"
    assert timing._parse_args([*base, "--torch-device", "cuda"]).torch_device == "cuda"
    with_code = timing._parse_args([*base, "--reference-code", "r"])
    assert with_code.names == ["paper_code", "torch_eager", "jax"]
    for bad in (
        ["--only", "paper_code"],
        ["--proxies", "naswot"],
        ["--profile"],
        ["--only", "jax_vmap"],
    ):
        with pytest.raises(SystemExit):
            timing._parse_args(base + bad)
    assert "paper_code needs --reference-code" in capsys.readouterr().err
    nb201 = ["--json", "x", "--reference-code", "r"]
    assert timing._parse_args(nb201).names == list(timing.WORKERS)
    trio = timing._parse_args([*nb201, "--proxies", TRIO]).names  # the WRCor-only rows go
    assert trio == ["paper_code", "paper_code_2proc", "torch_eager", "torch_eager_1thread",
                    "jax_composed", "jax_2workers"]  # fmt: skip
    assert "paper_code_2proc" not in timing._parse_args(["--json", "x"]).names
    for bad in (["--proxies", "zen"], ["--proxies", TRIO, "--only", "torch_compile"]):
        with pytest.raises(SystemExit):
            timing._parse_args(nb201 + bad)
    assert "torch_compile times WRCor alone" in capsys.readouterr().err
