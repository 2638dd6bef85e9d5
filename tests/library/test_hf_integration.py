"""The kernel-backed attention inside transformers' LLaVA: it changes nothing about the model's outputs,
it exports the same slices as eager `output_attentions`, it survives gradient checkpointing, and it
decodes with a KV cache."""
from __future__ import annotations

import copy

import pytest
import torch

from compodistill.models import (AttentionProbe, enable_compodistill_attention, enable_gradient_checkpointing,
                                 visual_token_positions)
from compodistill.distill import query_rows

from ..common import TRITON_SKIP_REASON, triton_runnable
from ..common import rel_err
from .model_helpers import BACKENDS, eager_copy, grads_of, make_batch, tiny, worst_grad_error

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _backend(backend):
    if backend == "triton" and not triton_runnable():
        pytest.skip(TRITON_SKIP_REASON)
    return backend


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def _masked_loss(logits, batch, weights):
    # A loss over the real positions only: padded rows carry no meaning in either implementation.
    return (logits * weights).sum(-1)[batch["attention_mask"].bool()].sum()


# Relative errors against the fp32 reference run on the same (rounded) weights: (logits, worst grad).
# fp16 runs the model in fp16 end to end; transformers' own fp16 eager attention lands at ~1.4e-3 / 4e-3
# on these models, and so does ours.
INTEGRATION_TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.float16: (5e-3, 2e-2)}


def _integration_cases():
    for backend in BACKENDS:
        for padding in ("right", "left"):
            for reference in ("eager", "sdpa"):
                yield pytest.param(backend, padding, reference, torch.float32,
                                   id=f"{backend}-{padding}-{reference}-fp32")
            yield pytest.param(backend, padding, "eager", torch.float16, id=f"{backend}-{padding}-eager-fp16")


@pytest.mark.parametrize("backend,padding,reference,dtype", list(_integration_cases()))
def test_integration_matches_hf_logits_and_grads(backend, padding, reference, dtype):
    """With compodistill attention on every LM layer, logits and all parameter gradients of a tiny
    GQA LLaVA equal transformers' eager / SDPA attention in fp32."""
    mllm = tiny("tiny-teacher")
    model = mllm.model.train().to(dtype)
    ref = copy.deepcopy(model).float()
    ref.set_attn_implementation({"text_config": reference})
    enable_compodistill_attention(model, backend=_backend(backend))
    batch = make_batch(mllm, padding=padding)
    weights = torch.randn(model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(3))

    logits = model(**_inputs(batch)).logits.float()
    ref_logits = ref(**_inputs(batch)).logits
    real = batch["attention_mask"].bool()
    assert not torch.isnan(logits[real]).any()
    logit_tol, grad_tol = INTEGRATION_TOLERANCE[dtype]
    assert rel_err(logits[real], ref_logits[real]) < logit_tol

    _masked_loss(logits, batch, weights).backward()
    _masked_loss(ref_logits, batch, weights).backward()
    got, want = grads_of(model), grads_of(ref)
    assert len(got) > 20
    assert not any(torch.isnan(g).any() for g in got.values())
    assert worst_grad_error(got, want) < grad_tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("which", ["text", "visual", "answer", "all"])
def test_exported_slices_equal_eager_attention_maps(backend, padding, which):
    """Teacher-style export (rows and mean) equals the head mean of eager attention probabilities
    over the selected rows and the visual keys, sample by sample."""
    mllm = tiny("tiny-teacher")
    model = mllm.model.eval()
    ref = eager_copy(model)
    enable_compodistill_attention(model, backend=_backend(backend))
    batch = make_batch(mllm, padding=padding, answer_gap=True)
    vs, nv = visual_token_positions(batch["input_ids"], mllm.image_token_id, mllm.num_image_tokens)
    rows = query_rows(which, batch["attention_mask"], batch["labels"], vs, nv)
    probe = AttentionProbe(rows, export={1: "rows", 5: "mean"})
    with torch.no_grad():
        model(**_inputs(batch), compodistill_probe=probe)
        maps = ref(**_inputs(batch), output_attentions=True).attentions
    assert set(probe.slices) == {1, 5}
    for b in range(batch["input_ids"].shape[0]):
        start, w = int(rows.query_start[b]), rows.row_weight[b].bool()
        want_rows = maps[1][b].mean(0)[start:start + rows.query_len, int(vs[b]):int(vs[b]) + nv]
        assert rel_err(probe.slices[1][b][w], want_rows[w]) < 1e-5
        full = maps[5][b].mean(0)[start:start + rows.query_len, int(vs[b]):int(vs[b]) + nv]
        want_mean = (full * w[:, None]).sum(0) / w.sum()
        assert rel_err(probe.slices[5][b], want_mean) < 1e-5


def test_rows_outside_a_sample_get_zero_weight():
    mllm = tiny("tiny-teacher")
    batch = make_batch(mllm, padding="left", answer_gap=True)
    vs, nv = visual_token_positions(batch["input_ids"], mllm.image_token_id, mllm.num_image_tokens)
    rows = query_rows("answer", batch["attention_mask"], batch["labels"], vs, nv)
    for b in range(3):
        positions = int(rows.query_start[b]) + torch.arange(rows.query_len)
        want = (batch["labels"][b, positions] != -100).float()
        assert torch.equal(rows.row_weight[b], want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_checkpointing_gives_the_same_gradients(backend):
    """Layers run twice under (non-reentrant) checkpointing; the fused alignment losses stored by
    layer_idx still backpropagate exactly once."""
    mllm = tiny("tiny-student")
    batch = make_batch(mllm)
    vs, nv = visual_token_positions(batch["input_ids"], mllm.image_token_id, mllm.num_image_tokens)
    rows = query_rows("text", batch["attention_mask"], batch["labels"], vs, nv)
    teacher = torch.rand(3, rows.query_len, nv, generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        model = tiny("tiny-student").model.train()
        enable_compodistill_attention(model, backend=_backend(backend))
        if checkpointing:
            enable_gradient_checkpointing(model)
        probe = AttentionProbe(rows, align={1: teacher, 2: teacher})
        logits = model(**_inputs(batch), compodistill_probe=probe).logits
        loss = logits.float().pow(2).mean() + probe.losses[1] + 2 * probe.losses[2]
        loss.backward()
        results.append((loss.detach(), grads_of(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b)
    assert worst_grad_error(grads_b, grads_a) < 1e-5


def test_greedy_generation_with_a_kv_cache_matches_eager():
    """Prefill runs the kernels; cached decoding steps (1 query, longer keys) take the SDPA path."""
    mllm = tiny("tiny-teacher")
    model = mllm.model.eval()
    ref = eager_copy(model)
    enable_compodistill_attention(model, backend="torch")
    batch = make_batch(mllm, padding="left", B=2)
    kwargs = dict(**_inputs(batch), max_new_tokens=5, do_sample=False, pad_token_id=mllm.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model.generate(**kwargs), ref.generate(**kwargs))


def test_vision_tower_keeps_sdpa_and_bad_requests_fail_clearly():
    mllm = tiny("tiny-student")
    model = enable_compodistill_attention(mllm.model, backend="torch")
    assert model.config.text_config._attn_implementation == "compodistill"
    assert model.config.vision_config._attn_implementation != "compodistill"
    with pytest.raises(ValueError, match="backend"):
        enable_compodistill_attention(model, backend="cuda")
    batch = make_batch(mllm)
    vs, nv = visual_token_positions(batch["input_ids"], mllm.image_token_id, mllm.num_image_tokens)
    rows = query_rows("text", batch["attention_mask"], batch["labels"], vs, nv)
    with pytest.raises(ValueError, match="export"):
        AttentionProbe(rows, export={1: "sum"})
    with pytest.raises(ValueError, match="more than one"):
        AttentionProbe(rows, export={1: "rows"}, align={1: torch.zeros(3, rows.query_len, nv)})
    probe = AttentionProbe(rows, align={1: torch.zeros(3, rows.query_len, nv + 1)})
    with pytest.raises(ValueError, match="teacher_slice"):
        model(**_inputs(batch), compodistill_probe=probe)
