"""Shared test set-up: Triton runs through its interpreter when no GPU is visible."""

import os

import torch

# Must be set before any @triton.jit function is defined (Triton reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
