"""pytest-benchmark: provider × mode × shape. On a machine without a GPU the CPU smoke shape runs the
torch path; the CUDA shapes skip with a reason."""

import pytest
import torch

from .providers import PROVIDERS, attention_flops, build, make_inputs
from .shapes import CPU_SMOKE, CPU_SMOKE_SEQ, CPU_SMOKE_VISUAL, MODELS, SEQ_LENS

CUDA = torch.cuda.is_available()
CPU_PROVIDERS = ("ours-align", "ours-flash", "ours-slice-export", "eager-align", "sdpa-flash+slice")

cases = [pytest.param(CPU_SMOKE, CPU_SMOKE_SEQ, "cpu", p, id=f"cpu-smoke-L{CPU_SMOKE_SEQ}-{p}")
         for p in CPU_PROVIDERS]
cases += [pytest.param(MODELS[m], L, "cuda", p, id=f"{m}-L{L}-{p}",
                       marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))
          for m in ("qwen1.5-1.8b", "qwen1.5-4b", "qwen2-1.5b-gqa") for L in SEQ_LENS for p in PROVIDERS]


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("shape, seq_len, device, provider", cases)
def test_attention(benchmark, shape, seq_len, device, provider, mode):
    if device == "cuda":
        q, k, v, starts, lens, teacher = make_inputs(shape, 1, seq_len, torch.bfloat16, device)
    else:
        q, k, v, starts, lens, teacher = make_inputs(shape, 1, seq_len, torch.float32, device,
                                                     visual_tokens=CPU_SMOKE_VISUAL, prompt=8)
    f = build(provider, q, k, v, starts, lens, teacher)

    def step():
        if mode == "forward":
            with torch.no_grad():
                return f()
        loss = f()
        loss.backward()
        return loss.detach()

    loss = benchmark(step)
    assert torch.isfinite(loss).all()
    benchmark.extra_info["tflop"] = attention_flops(1, shape.heads, seq_len, shape.head_dim, mode) * 1e-12
