"""What CPM costs over its class-agnostic baseline, measured in one run on one machine.

The CLI is ``tools/benchmark.py``; ``docs/benchmark.md`` says what is measured and how, with
the tables. One concept per module:

* :mod:`.models`: the baseline / CPM pair from one config (same weights but the class head) and
  one training / eval step of each, with the benchmark's own ``bench.*`` profiler labels;
* :mod:`.inputs`: batches, mapped by ``AVSDatasetMapper`` or synthesised in its output format;
* :mod:`.timing`: interleaved wall-clock timing (A B A B, order rotating) and the median of the
  per-repeat ratios;
* :mod:`.profiling`: the per-part breakdown from the model's ``record_function`` labels
  (``torch.profiler`` + ``key_averages()``); an expected label with no call raises;
* :mod:`.gmm`: one EM call and one prompt draw in isolation;
* :mod:`.loader`: data-loader throughput and the training loop's wait for data;
* :mod:`.memory`: peak memory of each model in a fresh process;
* :mod:`.report`: targets, tables and JSON;
* :mod:`.suite`: one run, in order (what the CLI calls).

Nothing here is imported by ``import cpm_d2``; importing it never needs CUDA.
"""
