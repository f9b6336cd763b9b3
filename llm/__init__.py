"""foundation-llm: pretraining language models with PEER feed-forward layers and Multi-head Latent Attention."""

__version__ = "0.1.0"
