"""Input data for the proxies: the seeded, augmented mini-batch of SPEC section 2."""

from wrcor_jax.data.batch import load_batch, load_npz, normalize, random_crop_flip, train_transform
from wrcor_jax.data.datasets import DATASETS, DataError, DatasetInfo, get_dataset_info

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "get_dataset_info",
    "load_batch",
    "load_npz",
    "normalize",
    "random_crop_flip",
    "train_transform",
]
