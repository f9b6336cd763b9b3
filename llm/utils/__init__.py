"""Utilities: evaluation and expert-usage analysis."""
