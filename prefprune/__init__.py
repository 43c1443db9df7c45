"""prefprune: influence-function pruning of preference datasets for reward models."""

__version__ = "0.1.0"
