"""Benchmark: plain causal attention, the output only (every layer that is not aligned runs this).

Providers: ours (`flash_attention`; ours-onepass with the one-pass backward), eager (materialized
probabilities), sdpa-flash (SDPA's flash backend), xformers (memory_efficient_attention) and flex
(FlexAttention, compiled on CUDA). TFLOP/s uses the causal FLOPs of docs/kernels.md; the H100's bf16
ceiling is ~790 TFLOP/s and published FA2 reaches ~300–330 TFLOP/s in the causal forward at d=128.
"""

import pytest

from .harness import attention_params, run_attention_case

OP = "flash"


@pytest.mark.parametrize("case, mode, provider", attention_params(OP))
def test_flash(benchmark, request, case, mode, provider):
    run_attention_case(benchmark, request, OP, case, mode, provider)
