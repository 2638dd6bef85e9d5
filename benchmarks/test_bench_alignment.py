"""Benchmark: attention with the fused cosine alignment loss (the student side of VAT).

Every provider computes the attention output and L = mean_rows (1 − cos(a_row, t_row)), with a the
head-mean attention of the text rows over the 729 visual keys and t a teacher slice; `full` and
`backward` give dq, dk, dv. Providers (see providers.py): ours (`attention_with_alignment`), eager
(materialized probabilities, what output_attentions costs), sdpa+slice / xformers+slice / flex+slice
(a flash kernel for the output and lse, the slice recomputed from the lse in PyTorch), and sdpa-flash
without any alignment, the speed reference: the target is ours ≥ 0.6× its fwd+bwd speed at L = 8192
(benchmarks/README.md lists the targets). ours-onepass is ours with the one-pass backward.
"""

import pytest

from .harness import attention_params, run_attention_case

OP = "alignment"


@pytest.mark.parametrize("case, mode, provider", attention_params(OP))
def test_alignment(benchmark, request, case, mode, provider):
    run_attention_case(benchmark, request, OP, case, mode, provider)
