"""Regenerate wrcor_jax/spaces/nb201_nats_order.npy from a NAS-Bench-201 ground-truth CSV.

NATS-Bench numbers its 15,625 architectures in an order no formula gives; the package stores
it as base-5 codes so `nb201.all_archs()` works without the benchmark files.

    python experiments/make_nb201_order.py ../shared/data/nb201_test_accuracy.csv
"""

import argparse
import csv
from pathlib import Path

import numpy as np

from wrcor_jax.spaces import nb201


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    args = parser.parse_args()
    with args.csv.open() as f:
        rows = sorted(csv.DictReader(f), key=lambda row: int(row["index"]))
    codes = np.asarray([nb201.arch_code(nb201.parse_arch(r["arch"])) for r in rows], np.int16)
    if len(codes) != nb201.NUM_ARCHS or len(set(codes.tolist())) != nb201.NUM_ARCHS:
        raise SystemExit(f"{args.csv}: expected all {nb201.NUM_ARCHS} distinct architectures")
    out = Path(nb201.__file__).with_name("nb201_nats_order.npy")
    np.save(out, codes)
    print(f"wrote {out} ({len(codes)} architectures)")


if __name__ == "__main__":
    main()
