"""Prompt, SFT and preference data: reading, chat formatting, tokenization, resumable batching.

    sources.py    sources read with HF `datasets` (jsonl/json/parquet/csv, compressed, saved
                  Dataset/DatasetDict + split)
    records.py    the fields each stage takes from a record
    chat.py       text and conversations -> token ids (the tokenizer's chat template)
    datasets.py   tokenized datasets (`datasets.map` once per node, cached), length policy, batches
    loader.py     deterministic, resumable, DP-sharded batches; evaluation passes

Every problem with the data raises `DataError`, whose message is one line: where, what, the fix.
"""

from gil_megatron.data.chat import Encoder, prepare_tokenizer
from gil_megatron.data.datasets import (
    PreferenceBatch,
    PreferenceDataset,
    PromptBatch,
    PromptDataset,
    SequenceBatch,
    SFTDataset,
    TooLong,
    load_preferences,
    load_prompts,
    load_sft,
    options_from_config,
    pad_token_id,
    tokenized_table,
)
from gil_megatron.data.loader import DataLoader, DistributedBatchSampler, eval_batches
from gil_megatron.data.records import HH_ASSISTANT, split_hh_dialogue
from gil_megatron.data.sources import DataError, Record, read_records

__all__ = [
    "DataError", "DataLoader", "DistributedBatchSampler", "Encoder", "HH_ASSISTANT", "PreferenceBatch",
    "PreferenceDataset", "PromptBatch", "PromptDataset", "Record", "SequenceBatch", "SFTDataset", "TooLong",
    "eval_batches", "load_preferences", "load_prompts", "load_sft", "options_from_config", "pad_token_id",
    "prepare_tokenizer", "read_records", "split_hh_dialogue", "tokenized_table",
]
