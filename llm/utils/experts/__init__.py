"""Expert-usage tracking and metrics for PEER layers."""
