"""Evaluation data: RTTM/UEM/LST I/O and declared datasets."""

from __future__ import annotations

from diaropt.data.annotations import (
    DataError,
    get_reference,
    load_lst,
    load_rttm,
    load_uem,
    write_rttm,
)
from diaropt.data.datasets import (
    DATASET_NAMES,
    Dataset,
    DatasetItem,
    load_dataset,
)
from diaropt.data.synthetic import make_synthetic_conversation

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "Dataset",
    "DatasetItem",
    "get_reference",
    "load_dataset",
    "load_lst",
    "load_rttm",
    "load_uem",
    "make_synthetic_conversation",
    "write_rttm",
]
