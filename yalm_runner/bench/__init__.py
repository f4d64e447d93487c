"""Measurement, beside the engine: the benchmarks behind ``yalm-runner bench`` and
``benchmarks/RESULTS.md``.

The arrows point one way, up from the base:

- ``synthetic`` (shapes, random weights, the bench's workspace estimate) and ``link`` (the
  host-to-device rates) and ``table`` (rows and ratios) at the base;
- ``ours``, ``peers``, ``disk``, ``envelope``, ``multigpu`` and ``calibrate`` (the step-time
  model's rates, measured through the engine's own caches and reader) above them, each one
  measurement;
  ``peers``, ``envelope`` and ``multigpu`` also run as ``python -m yalm_runner.bench.<name>``;
- ``comparison`` (``yalm-runner bench``) at the top, composing ours, the peers and the disk.

A benchmark may import the engine; no engine module imports a benchmark (the architecture test
holds both). This file imports nothing, so a child run of ``bench.peers`` loads only what it uses.
"""
