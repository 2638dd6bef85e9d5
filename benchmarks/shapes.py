"""The one registry of benchmark shapes: real model attention configs and the LLaVA token layout."""

from dataclasses import dataclass


@dataclass(frozen=True)
class AttnShape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int


MODELS = {
    "qwen1.5-1.8b": AttnShape("qwen1.5-1.8b", 16, 16, 128),
    "qwen1.5-4b": AttnShape("qwen1.5-4b", 20, 20, 128),
    "qwen2-1.5b-gqa": AttnShape("qwen2-1.5b-gqa", 12, 2, 128),
}
SEQ_LENS = (1024, 2048, 4096, 8192)
PROMPT_TOKENS = 35      # system prompt before the image
VISUAL_TOKENS = 729     # SigLIP so400m-patch14-384
CPU_SMOKE = AttnShape("cpu-smoke", 4, 2, 32)
CPU_SMOKE_SEQ = 96
CPU_SMOKE_VISUAL = 24


def layout(seq_len, visual_tokens=VISUAL_TOKENS, prompt=PROMPT_TOKENS):
    """(visual_start, visual_len, query_start, query_len): the text rows after the image are the queries."""
    query_start = prompt + visual_tokens
    return prompt, visual_tokens, query_start, seq_len - query_start
