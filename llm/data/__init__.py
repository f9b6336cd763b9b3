"""Data: sources, mixing, tokenisation, packing and resumable loaders.

Public entry points (see DEVELOPERS.md, "Data"):
``build_tokenizer(dataset_config)``, ``build_train_loader(dataset_config, tokenizer, batch_size, rank, world_size)``,
``build_val_loader(...)``. Batches are dicts of (B, S) int64 tensors ``input_ids``, ``labels`` (next-token
targets; ``IGNORE_INDEX`` = -100 on padding) and ``doc_ids`` (document number within the row).
"""

from llm.data.loader import TrainLoader, ValLoader, build_train_loader, build_val_loader
from llm.data.packing import IGNORE_INDEX
from llm.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["IGNORE_INDEX", "Tokenizer", "TrainLoader", "ValLoader", "build_tokenizer", "build_train_loader", "build_val_loader"]
