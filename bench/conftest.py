"""pytest set-up for the benchmarks: collect `bench_*.py` (the default pattern only finds `test_*.py`)."""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; adding them again duplicates.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
