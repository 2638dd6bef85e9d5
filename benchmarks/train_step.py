"""One DFT training step for the benchmarks, on our attention or on eager attention with output_attentions.

The step: teacher forward under no_grad with the visual slices of the matched teacher layers exported,
student forward with the lm, kd and vat losses, student backward, gradients dropped (no optimizer: its
memory and time do not depend on the attention). VAT aligns every student layer against group windows
of teacher layers, text query rows, per-row cosine.

- ours: `Distiller` with compodistill attention (Triton on CUDA, the PyTorch path on the CPU): the
  teacher exports slices from the fused kernel, the student's loss is fused into its attention.
- eager: the same models with transformers' eager attention and `output_attentions=True`: every layer's
  (B, H, L, L) probabilities are returned; the slices are cut from them and the same cosine, logit KD
  (the library's chunked `lm_and_kd_losses`) and layer reduction are applied. Only the attention differs.

Models (CUDA): teacher with Qwen1.5-4B layer shapes, student with Qwen1.5-1.8B layer shapes, both with the
real 151936-token vocabulary, truncated to `shapes.TRAIN_LAYERS` layers (half depth), a one-layer SigLIP-shaped vision
tower giving 729 visual tokens, TAF projector, bf16 weights, the LM fully trainable. CPU: the tiny presets.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from compodistill.distill import DistillConfig, Distiller, VATConfig, lm_and_kd_losses, query_rows
from compodistill.distill.vat import combine_layers, group_targets, slice_loss
from compodistill.models import apply_taf, build_preset, enable_compodistill_attention, parts, visual_token_positions
from compodistill_kernels.attention.naive import naive_visual_slice

from .harness import free_memory, peak_memory_mib
from .shapes import (LANGUAGE_MODELS, PROMPT_TOKENS, TRAIN_IMAGE_SIZE, TRAIN_LAYERS, TRAIN_MAX_SEQ_LEN,
                     TRAIN_PATCH_SIZE)

PROVIDERS = ("eager", "ours")
CPU_PROMPT_TOKENS = 4
# A small vision tower: its cost is not what this benchmark measures, only its 729 tokens are.
_VISION = dict(image_size=TRAIN_IMAGE_SIZE, patch_size=TRAIN_PATCH_SIZE, hidden_size=128, intermediate_size=256,
               num_hidden_layers=1, num_attention_heads=2)


def _text_overrides(name, layers):
    lm = LANGUAGE_MODELS[name]
    return dict(hidden_size=lm.hidden, num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads,
                intermediate_size=lm.intermediate, vocab_size=lm.vocab, num_hidden_layers=layers,
                max_position_embeddings=max(lm.max_positions, TRAIN_MAX_SEQ_LEN))


@dataclass
class DFTSetup:
    distiller: Distiller
    device: str

    @property
    def dtype(self):
        return next(self.distiller.student.parameters()).dtype


@functools.lru_cache(maxsize=2)
def dft_setup(teacher_name, student_name, device, teacher_layers=None, student_layers=None) -> DFTSetup:
    """Teacher, student and Distiller, built once per session (on the device directly, in bf16 on CUDA).
    Layer counts default to `shapes.TRAIN_LAYERS` (ignored by the tiny presets)."""
    if teacher_name.startswith("tiny"):
        teacher = build_preset(teacher_name, seed=1)
        student = build_preset(student_name, seed=2)
        with torch.no_grad():
            # Fresh tiny models attend almost uniformly, so teacher and student slices agree to 1e-5 and
            # the VAT term is noise; sharper queries and keys give it a size the smoke checks can compare.
            for mllm in (teacher, student):
                for name, param in parts.language_model(mllm).named_parameters():
                    if "q_proj.weight" in name or "k_proj.weight" in name:
                        param.mul_(6.0)
    else:
        teacher_text = _text_overrides(teacher_name, teacher_layers or TRAIN_LAYERS["teacher"])
        student_text = _text_overrides(student_name, student_layers or TRAIN_LAYERS["student"])
        with torch.device(device):  # draw the billions of weights on the GPU, not the CPU
            teacher = build_preset("tiny-teacher", seed=1, torch_dtype=torch.bfloat16, vision_overrides=_VISION,
                                   text_overrides=teacher_text)
            student = build_preset("tiny-student", seed=2, torch_dtype=torch.bfloat16, vision_overrides=_VISION,
                                   text_overrides=student_text)
    apply_taf(student, teacher)
    for mllm in (teacher, student):
        mllm.model.to(device)
        mllm.model.model.vision_tower.requires_grad_(False)  # frozen in every stage
    config = DistillConfig(vat=VATConfig(student_layers="all", teacher_layers="all",
                                                        matching="group", query_rows="text"))
    distiller = Distiller(student, teacher, config, backend="auto").train()
    return DFTSetup(distiller, device)


def use_attention(setup: DFTSetup, provider):
    """Switch both language models to our attention or to transformers' eager attention."""
    for model in (setup.distiller.student, setup.distiller.teacher):
        if provider == "ours":
            enable_compodistill_attention(model, backend="auto")
        elif provider == "eager":
            model.set_attn_implementation({"text_config": "eager"})
        else:
            raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def make_batch(setup: DFTSetup, batch, seq_len, seed=0):
    """Prompt, one image's tokens, then text to L; every text token after the image is supervised."""
    distiller = setup.distiller
    num_visual = distiller.num_image_tokens
    prompt = PROMPT_TOKENS if seq_len > PROMPT_TOKENS + num_visual + 8 else CPU_PROMPT_TOKENS
    text_start = prompt + num_visual
    if text_start >= seq_len:
        raise ValueError(f"seq_len: {seq_len} leaves no text after {prompt} prompt and {num_visual} image tokens")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 800, (batch, seq_len), generator=g)  # ordinary tokens of the tiny tokenizer
    ids[:, prompt:text_start] = distiller.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, text_start:] = ids[:, text_start:]
    vision = distiller.student.config.vision_config
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=g)
    return dict(input_ids=ids.to(setup.device), attention_mask=torch.ones_like(ids).to(setup.device),
                labels=labels.to(setup.device), pixel_values=pixels.to(setup.device, setup.dtype))


def _head_mean_slices(attentions, rows, layers):
    return {layer: naive_visual_slice(attentions[layer], rows.visual_start, rows.visual_len, rows.query_start,
                                      rows.query_len) for layer in layers}


def eager_dft_losses(distiller: Distiller, batch) -> dict:
    """lm, kd, vat and loss of the DFT stage from eager attention maps (output_attentions=True)."""
    cfg = distiller.config
    student, teacher = distiller.student, distiller.teacher
    visual_start, visual_len = visual_token_positions(batch["input_ids"], distiller.image_token_id,
                                                      distiller.num_image_tokens)
    rows = query_rows(cfg.vat.query_rows, batch["attention_mask"], batch["labels"], visual_start, visual_len)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"], use_cache=False, output_attentions=True)
    with torch.no_grad():
        teacher_out = teacher.model(**inputs)
    teacher_layers = sorted({layer for match in distiller.matches for layer in match.teacher_layers})
    targets = group_targets(_head_mean_slices(teacher_out.attentions, rows, teacher_layers), distiller.matches)
    teacher_hidden = teacher_out.last_hidden_state
    del teacher_out
    student_out = student.model(**inputs)
    student_slices = _head_mean_slices(student_out.attentions, rows, sorted(targets))
    per_layer = {layer: slice_loss(student_slices[layer], targets[layer], rows.row_weight, loss="cosine",
                                   eps=cfg.vat.eps) for layer in targets}
    student_hidden = student_out.last_hidden_state
    del student_out, student_slices
    losses = lm_and_kd_losses(student_hidden, batch["labels"], student.lm_head, teacher_hidden=teacher_hidden,
                              teacher_head=teacher.lm_head, kind=cfg.kd.kind, temperature=cfg.kd.temperature,
                              chunk_size=cfg.kd.chunk_size)
    losses["vat"] = combine_layers(per_layer, cfg.vat.layer_reduction)
    losses["loss"] = sum(getattr(cfg.weights, name) * losses[name] for name in ("lm", "kd", "vat"))
    return losses


def train_info(setup: DFTSetup, case, provider) -> dict:
    """What ran, as recorded beside every training-step measurement (pytest benchmarks and gpu_suite)."""
    student, teacher = setup.distiller.student.config.text_config, setup.distiller.teacher.config.text_config
    return dict(op="train_step", mode="full", model=f"{case.teacher}->{case.student}", teacher=case.teacher,
                student=case.student, teacher_layers=teacher.num_hidden_layers,
                student_layers=student.num_hidden_layers, vocab=student.vocab_size, batch=case.batch,
                seq_len=case.seq_len, visual_tokens=setup.distiller.num_image_tokens,
                dtype=str(setup.dtype).replace("torch.", ""), device=case.device, provider=provider)


def make_train_step(setup: DFTSetup, provider, batch):
    """step() -> the detached losses of one DFT step (forward, backward, gradients dropped)."""
    use_attention(setup, provider)
    distiller = setup.distiller
    losses_of = distiller if provider == "ours" else functools.partial(eager_dft_losses, distiller)
    sync = torch.cuda.synchronize if setup.device == "cuda" else (lambda: None)

    def step():
        losses = losses_of(batch)
        losses["loss"].backward()
        distiller.zero_grad(set_to_none=True)
        sync()
        return {name: value.detach() for name, value in losses.items()}
    return step


@dataclass
class FitSearch:
    """The outcome of `longest_fitting_length`: peak MiB per length tried, the longest length that fit,
    its step's wall time (the peak-measuring run), the first length that ran out of memory, and why the
    search stopped early (None when it ran to the cap or to an OOM)."""

    peaks: dict = field(default_factory=dict)
    longest: int | None = None
    longest_ms: float | None = None
    first_oom: int | None = None
    stopped: str | None = None


def longest_fitting_length(setup: DFTSetup, provider, batch, start, cap, device, *, warmup=False,
                           time_left=None) -> FitSearch:
    """Double the sequence length from `start` up to `cap` until a training step runs out of GPU memory.

    warmup: run each step once before measuring its peak (autotuning and allocator warm-up outside it).
    time_left: optional callable; the search stops (stopped="time budget") when it returns False.
    """
    found = FitSearch()
    seq_len = start
    while seq_len <= cap:
        if time_left is not None and not time_left():
            found.stopped = "time budget"
            break
        try:
            step = make_train_step(setup, provider, make_batch(setup, batch, seq_len))
            if warmup:
                step()
            begin = time.perf_counter()
            found.peaks[seq_len] = peak_memory_mib(step, device)
            elapsed_ms = (time.perf_counter() - begin) * 1e3
            del step
        except torch.cuda.OutOfMemoryError:
            found.first_oom = seq_len
        if found.first_oom is not None:
            free_memory()  # outside the except block, so the failed step's tensors are released
            break
        found.longest, found.longest_ms = seq_len, elapsed_ms
        seq_len *= 2
        free_memory()
    return found
