"""What the benchmarks run inside Flower's processes, and what their scripts share.

* :mod:`benchmarks.apps.methods`: the methods and the comparison bundle's run-config keys;
* :mod:`benchmarks.apps.grids`: grids that forward, meter or deliver in process;
* :mod:`benchmarks.apps.records`: the per-round records, outcome and final model a
  benchmark run writes to its own directory, and :class:`~benchmarks.apps.records.RecordingGate`,
  the round gate that does it (the product's ServerApp reports to the consortium server's
  API instead and writes no files);
* :mod:`benchmarks.apps.metering`: bytes and messages per site and round;
* :mod:`benchmarks.apps.secaggplus_rounds`: Flower SecAgg+ as a study's train phase;
* :mod:`benchmarks.apps.compare_server`: the comparison ServerApp and its bundle;
* :mod:`benchmarks.apps.compare_client`: the comparison ClientApp (SecAgg+ at the site);
* :mod:`benchmarks.apps.runs`: ``flwr run`` of the comparison bundle and waiting for it.

Nothing is imported here: the scale benchmark's driver must not pull in torch.
"""
