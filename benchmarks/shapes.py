"""The one registry of benchmark shapes: real model configs, the LLaVA token layout, and the cases built
from them. Benchmark files take their parameters from here and hard-code none.

Attention shapes (heads, kv heads, head dim) are those of Qwen1.5-1.8B, Qwen1.5-4B and Qwen2-1.5B (GQA).
The token layout is LLaVA's: a ~35-token prompt, 729 SigLIP so400m-patch14-384 visual tokens, then text;
the query rows of the visual slice are the text rows after the image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttnShape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class LMShape:
    """The layer shapes of a Qwen2-architecture language model (Qwen1.5 is one)."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    layers: int
    max_positions: int = 32768

    @property
    def attention(self) -> AttnShape:
        return AttnShape(self.name, self.heads, self.kv_heads, self.hidden // self.heads)


LANGUAGE_MODELS = {
    "qwen1.5-1.8b": LMShape("qwen1.5-1.8b", hidden=2048, heads=16, kv_heads=16, intermediate=5504,
                            vocab=151936, layers=24),
    "qwen1.5-4b": LMShape("qwen1.5-4b", hidden=2560, heads=20, kv_heads=20, intermediate=6912,
                          vocab=151936, layers=40),
}
MODELS = {
    "qwen1.5-1.8b": LANGUAGE_MODELS["qwen1.5-1.8b"].attention,
    "qwen1.5-4b": LANGUAGE_MODELS["qwen1.5-4b"].attention,
    "qwen2-1.5b-gqa": AttnShape("qwen2-1.5b-gqa", 12, 2, 128),
}
SEQ_LENS = (1024, 2048, 4096, 8192)
BATCHES = (1, 2, 4, 8)
BATCH_SWEEP_SEQ_LEN = 4096  # the batch sweep runs at the length the slice-export target names
PROMPT_TOKENS = 35          # system prompt before the image
VISUAL_TOKENS = 729         # SigLIP so400m-patch14-384: (384 // 14)² patches

# The CPU twin of every CUDA case: the same code path on a shape a 2-core CPU runs in milliseconds.
CPU_SMOKE = AttnShape("cpu-smoke", 4, 2, 32)
CPU_SMOKE_SEQ = 96
CPU_SMOKE_BATCH = 2
CPU_SMOKE_VISUAL = 24
CPU_SMOKE_PROMPT = 8

# Training step: teacher with Qwen1.5-4B layers, student with Qwen1.5-1.8B layers, truncated to half
# depth (20 of 40, 12 of 24; `--bench-train-layers 40,24` runs the full depth). Eager attention keeps
# ~6.4 GiB of probabilities per student layer at L=8192 (16 heads: a bf16 and an fp32 copy of B·H·L²),
# so 12 layers are enough to exceed an 80 GB GPU there, as the full model does; ours keeps well under
# 1 GiB per layer. The vocabulary stays real (151936): the logit KD's memory depends on it.
TRAIN_TEACHER, TRAIN_STUDENT = "qwen1.5-4b", "qwen1.5-1.8b"
TRAIN_LAYERS = {"teacher": 20, "student": 12}
TRAIN_BATCH = 1
TRAIN_IMAGE_SIZE, TRAIN_PATCH_SIZE = 378, 14   # (378 / 14)² = 729 visual tokens
TRAIN_MAX_SEQ_LEN = 32768                      # Qwen1.5's context length: the fit search stops here
CPU_TRAIN_SEQ = 48
CPU_TRAIN_MAX_SEQ = 192


def layout(seq_len, visual_tokens=VISUAL_TOKENS, prompt=PROMPT_TOKENS):
    """(visual_start, visual_len, query_start, query_len): the text rows after the image are the queries."""
    query_start = prompt + visual_tokens
    if query_start >= seq_len:
        raise ValueError(f"seq_len: {seq_len} leaves no text row after {prompt} prompt and {visual_tokens} "
                         "visual tokens")
    return prompt, visual_tokens, query_start, seq_len - query_start


@dataclass(frozen=True)
class Case:
    """One attention problem: a head shape, a batch, a length and where it runs."""

    shape: AttnShape
    batch: int
    seq_len: int
    device: str
    visual_tokens: int = VISUAL_TOKENS
    prompt: int = PROMPT_TOKENS

    @property
    def id(self) -> str:
        return f"{self.shape.name}-B{self.batch}-L{self.seq_len}"

    @property
    def dtype(self) -> torch.dtype:
        # bf16 is what training runs in; the CPU smoke uses fp32, the dtype CPU kernels are written for.
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    def layout(self):
        return layout(self.seq_len, self.visual_tokens, self.prompt)


CPU_CASE = Case(CPU_SMOKE, CPU_SMOKE_BATCH, CPU_SMOKE_SEQ, "cpu", CPU_SMOKE_VISUAL, CPU_SMOKE_PROMPT)


def attention_cases():
    """The CPU smoke case, then per model the length sweep at batch 1 and the batch sweep at 4096."""
    cases = [CPU_CASE]
    for shape in MODELS.values():
        cases += [Case(shape, 1, seq_len, "cuda") for seq_len in SEQ_LENS]
        cases += [Case(shape, batch, BATCH_SWEEP_SEQ_LEN, "cuda") for batch in BATCHES if batch > 1]
    return cases


@dataclass(frozen=True)
class TrainCase:
    """One DFT training step: teacher and student presets, batch and length."""

    teacher: str
    student: str
    batch: int
    seq_len: int
    device: str

    @property
    def id(self) -> str:
        return f"{self.teacher}-to-{self.student}-B{self.batch}-L{self.seq_len}"


CPU_TRAIN_CASE = TrainCase("tiny-teacher", "tiny-student", 2, CPU_TRAIN_SEQ, "cpu")


def train_cases():
    return [CPU_TRAIN_CASE] + [TrainCase(TRAIN_TEACHER, TRAIN_STUDENT, TRAIN_BATCH, seq_len, "cuda")
                               for seq_len in SEQ_LENS]


@functools.lru_cache(maxsize=None)
def _cases_by_id():
    return {case.id: case for case in attention_cases() + train_cases()}


def case_by_id(case_id):
    """The attention or training-step case with this id (benchmarks parametrize by id, which pytest-benchmark
    stores in its JSON as is)."""
    cases = _cases_by_id()
    if case_id not in cases:
        raise ValueError(f"case: unknown id {case_id!r}")
    return cases[case_id]
