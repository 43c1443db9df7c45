"""`PREFPRUNE_IMPL` dispatch: auto falls back with reasons, explicit requests raise or name the reference."""

from __future__ import annotations

import pytest

from prefprune.ops.dispatch import FastPath, ImplUnavailableError, requested_impl, select


def _fast(name: str, reasons: list[str]) -> FastPath:
    return FastPath(name, lambda: reasons, lambda: (lambda: name))


def _ref():
    return "reference"


def test_auto_takes_the_first_usable_path_and_records_declined_ones():
    sel = select("op", [_fast("triton", ["no GPU"]), _fast("native", [])], _ref, impl="auto")
    assert sel.name == "native" and sel.fn() == "native"
    assert sel.declined == {"triton": ["no GPU"]}
    sel = select("op", [_fast("triton", ["no GPU"])], _ref, impl="auto")
    assert sel.name == "reference" and sel.declined == {"triton": ["no GPU"]}


def test_explicit_request_that_cannot_run_raises_with_reasons():
    expected = r"op: PREFPRUNE_IMPL=triton cannot be used \(triton: no GPU\)"
    with pytest.raises(ImplUnavailableError, match=expected):
        select("op", [_fast("triton", ["no GPU"])], _ref, impl="triton")


def test_explicit_request_for_a_path_the_op_lacks_runs_the_reference(monkeypatch):
    # One PREFPRUNE_IMPL serves every op: native must not break the ops that only have Triton.
    monkeypatch.setenv("PREFPRUNE_IMPL", "native")
    sel = select("segment_op", [_fast("triton", [])], _ref)
    assert sel.name == "reference"
    assert sel.declined == {"native": ["segment_op has no native implementation"]}


def test_requested_impl_validates(monkeypatch):
    monkeypatch.setenv("PREFPRUNE_IMPL", " Native ")
    assert requested_impl() == "native"
    assert requested_impl("reference") == "reference"
    with pytest.raises(ValueError, match="got 'cuda'"):
        requested_impl("cuda")
