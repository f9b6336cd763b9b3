"""Data: sources, mixing, tokenisation, packing and resumable loaders."""
