"""Datasets read from local files, partitioners that split them across clients, augmentation."""

from baffle.data.augment import augment_batch
from baffle.data.datasets import (
    CIFAR10_CLASSES,
    NORMALIZE_CHOICES,
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
    "NORMALIZE_CHOICES",
    "ArrayDataset",
    "DatasetBuilder",
    "Partition",
    "augment_batch",
    "dataset_names",
    "load_dataset",
    "parse_partition",
    "partition_indices",
    "read_idx",
    "register_dataset",
]
