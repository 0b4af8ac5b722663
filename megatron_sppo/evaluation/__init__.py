"""Benchmark evaluation: the paper's math benchmarks from local files, k samples per problem
from any rollout engine, avg@k / pass@k / length / truncation, JSON and markdown reports."""

from megatron_sppo.evaluation.benchmarks import (BENCHMARKS, benchmark_key, load_benchmark,
                                                 load_benchmarks)
from megatron_sppo.evaluation.metrics import pass_at_k, summarize
from megatron_sppo.evaluation.run import (PAPER_SAMPLING, evaluate, flat_metrics,
                                          markdown_table, write_report)

__all__ = ["BENCHMARKS", "PAPER_SAMPLING", "benchmark_key", "evaluate", "flat_metrics",
           "load_benchmark", "load_benchmarks", "markdown_table", "pass_at_k", "summarize",
           "write_report"]
