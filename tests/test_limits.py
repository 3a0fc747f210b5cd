"""Limits fitted to a machine: a request is resolved where the trial runs."""

from __future__ import annotations

from dataclasses import replace

from runner.sandbox import LimitRequest, Limits, Machine, default_limits, resolve
from runner.sandbox.limits import CPUS_ENV, MEMORY_ENV

BIG = Machine(cpus=64, memory_bytes=512 * 2**30)
SMALL = Machine(cpus=2, memory_bytes=8 * 2**30)


def test_defaults_cap_at_the_machine_and_split_by_share():
    assert default_limits(BIG) == Limits()                      # a big box: the defaults
    small = default_limits(SMALL, share=2)
    assert (small.cpus, small.memory_bytes, small.score_memory_bytes) == (1.0, 3 * 2**30, 2 * 2**30)


def test_a_request_keeps_what_was_set_and_fits_the_rest():
    request = LimitRequest(memory_bytes=2**30, cpus=1.5, share=None)
    limits = request.resolve(SMALL, share=2)
    assert limits == replace(default_limits(SMALL, share=2), memory_bytes=2**30, cpus=1.5)
    assert resolve(limits, BIG) is limits                      # fixed limits stay as they are


def test_the_machine_size_can_be_set(monkeypatch):
    monkeypatch.setenv(CPUS_ENV, "3")
    monkeypatch.setenv(MEMORY_ENV, "1.5")
    assert Machine.here() == Machine(cpus=3.0, memory_bytes=int(1.5 * 2**30))
