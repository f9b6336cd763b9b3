"""Models: Multi-head Latent Attention, PEER and dense FFNs, the foundation decoder."""
