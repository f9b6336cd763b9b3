"""Evaluation: perplexity, benchmark adapters, model size and FLOP counts."""
