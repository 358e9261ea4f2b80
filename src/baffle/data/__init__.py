"""Datasets read from local files, and partitioners that split them across clients."""

from baffle.data.datasets import (
    CIFAR10_CLASSES,
    ArrayDataset,
    DatasetBuilder,
    dataset_names,
    load_dataset,
    read_idx,
    register_dataset,
)
from baffle.data.partition import Partition, parse_partition, partition_indices

__all__ = [
    "CIFAR10_CLASSES",
    "ArrayDataset",
    "DatasetBuilder",
    "Partition",
    "dataset_names",
    "load_dataset",
    "parse_partition",
    "partition_indices",
    "read_idx",
    "register_dataset",
]
