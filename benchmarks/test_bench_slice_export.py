"""Benchmark: attention with the visual-slice export (the teacher side of VAT).

Every provider computes the attention output and the head-mean slice a[b, i, j] of the text rows i over
the 729 visual keys j, (B, rows, 729) float32. The teacher runs it in `forward` under no_grad; `backward`
and `full` (dq, dk, dv for random output and slice gradients) are what a student pays when its slices
are exported for a loss other than the fused cosine. Providers: ours (`attention_with_visual_slice`),
eager (materialized probabilities), sdpa+slice / xformers+slice / flex+slice (flash output and lse, slice
recomputed from the lse), and sdpa-flash with no slice as the speed reference.
"""

import pytest

from .harness import attention_params, run_attention_case

OP = "slice_export"


@pytest.mark.parametrize("case, mode, provider", attention_params(OP))
def test_slice_export(benchmark, request, case, mode, provider):
    run_attention_case(benchmark, request, OP, case, mode, provider)
