"""Data pipeline: corpus -> prepare -> indexed dataset -> repetition schedule -> training stream.

    prepare_dataset(out_dir, documents, ...)      text -> dataset folder (GPT-NeoX/Megatron .bin/.idx)
    open_dataset(path)                            -> PreparedDataset (.train, .test, .tokenizer, ...)
    RepetitionSchedule(...)                       position -> (window, repeated?, pass), stateless
    TrainingStream(dataset, seq_len, ...)         batches in the schedule's exact order
    audit_schedule(stream), show_batch(stream, step, global_batch)
"""
from .audit import audit_schedule, format_audit_table, format_batch_table, show_batch
from .dataset import (
    DatasetError,
    MissingSplitError,
    PreparedDataset,
    iter_windows,
    num_windows,
    open_dataset,
    read_windows,
)
from .indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, token_dtype_for_vocab
from .prepare import EOT_TOKEN, prepare_dataset
from .sampler import TrainingStream, open_training_stream
from .schedule import FeistelPermutation, RepetitionSchedule, ScheduleError

__all__ = [
    "DatasetError",
    "EOT_TOKEN",
    "FeistelPermutation",
    "IndexedDataset",
    "IndexedDatasetError",
    "IndexedDatasetWriter",
    "MissingSplitError",
    "PreparedDataset",
    "RepetitionSchedule",
    "ScheduleError",
    "TrainingStream",
    "audit_schedule",
    "format_audit_table",
    "format_batch_table",
    "iter_windows",
    "num_windows",
    "open_dataset",
    "open_training_stream",
    "prepare_dataset",
    "read_windows",
    "show_batch",
    "token_dtype_for_vocab",
]
