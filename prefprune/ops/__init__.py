"""Ops with one pure-PyTorch reference each and optional native/Triton fast paths."""
