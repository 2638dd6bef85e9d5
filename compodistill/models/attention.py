"""Runs every language-model layer of a Hugging Face model on `compodistill_kernels`.

`enable_compodistill_attention(model)` registers the attention function and its mask function under
the name "compodistill" and switches the language model to it; the vision tower keeps SDPA.

A forward call can then carry a `compodistill_probe=AttentionProbe(...)` keyword argument. transformers
passes extra keyword arguments of LlavaForConditionalGeneration.forward down to every LM attention
call, so the request travels with the call and there is no global state:

- layers listed in `probe.export` return their head-averaged visual slice in `probe.slices[layer]`
  (differentiable; teachers run them under no_grad);
- layers listed in `probe.align` compute the fused cosine alignment loss against the given teacher
  slice and store it in `probe.losses[layer]`;
- layers listed in `probe.intervene` (analysis only) mix a teacher slice into their own visual
  attention at inference: the paper's intervention, computed with explicit probabilities;
- every other layer runs plain flash attention.

Results are stored by `layer_idx` (never appended), so a layer that gradient checkpointing runs again
in the backward overwrites its own entry instead of adding one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from compodistill_kernels import BACKENDS, attention_with_alignment, attention_with_visual_slice, flash_attention

from . import parts

ATTENTION_NAME = "compodistill"


@dataclass
class SliceRows:
    """Which query rows and visual keys a slice covers, per sample, in one of two forms per axis.

    Contiguous: visual_start / query_start (B,) long with visual_len / query_len ints: every sample's
    keys (rows) are one window of that length. Indexed: visual_index / query_index (B, N) int64
    sequence positions, padded at the end with -1: any number of keys (rows) per sample, in any
    number of runs (several images, tiles). An axis takes one form; the two axes may differ.
    row_weight: (B, query_len) float with 0 for rows that belong to no sample, or None.
    """

    visual_start: torch.Tensor | None = None
    visual_len: int | None = None
    query_start: torch.Tensor | None = None
    query_len: int | None = None
    row_weight: torch.Tensor | None = None
    visual_index: torch.Tensor | None = None
    query_index: torch.Tensor | None = None

    def __post_init__(self):
        for axis in ("visual", "query"):
            index = getattr(self, f"{axis}_index")
            span = (getattr(self, f"{axis}_start"), getattr(self, f"{axis}_len"))
            if (index is None) == (span[0] is None or span[1] is None):
                raise ValueError(f"{axis}: give either {axis}_index or both {axis}_start and {axis}_len")

    @property
    def batch_size(self) -> int:
        source = self.visual_index if self.visual_index is not None else self.visual_start
        return int(source.shape[0])

    @property
    def num_visual(self) -> int:
        """Columns of a slice: visual_len, or the width of visual_index."""
        return int(self.visual_index.shape[1]) if self.visual_index is not None else int(self.visual_len)

    @property
    def num_query(self) -> int:
        """Rows of a slice: query_len, or the width of query_index."""
        return int(self.query_index.shape[1]) if self.query_index is not None else int(self.query_len)

    def visual_positions(self) -> torch.Tensor:
        """(B, num_visual) long: the visual key positions, -1 on padding (both forms)."""
        if self.visual_index is not None:
            return self.visual_index
        return self.visual_start[:, None] + torch.arange(self.visual_len, device=self.visual_start.device)

    def query_positions(self) -> torch.Tensor:
        """(B, num_query) long: the query row positions, -1 on padding (both forms)."""
        if self.query_index is not None:
            return self.query_index
        return self.query_start[:, None] + torch.arange(self.query_len, device=self.query_start.device)

    def column_mask(self) -> torch.Tensor | None:
        """(B, num_visual) bool, True on real visual columns; None when every column is real."""
        return None if self.visual_index is None else self.visual_index >= 0

    def kernel_arguments(self) -> dict:
        """The keyword arguments of attention_with_visual_slice / attention_with_alignment."""
        if self.visual_index is not None:
            visual = {"visual_index": self.visual_index}
        else:
            visual = {"visual_start": self.visual_start, "visual_len": int(self.visual_len)}
        if self.query_index is not None:
            query = {"query_index": self.query_index}
        else:
            query = {"query_start": self.query_start, "query_len": int(self.query_len)}
        return {**visual, **query, "row_weight": self.row_weight}

    def to(self, device) -> "SliceRows":
        moved = {name: (value.to(device) if torch.is_tensor(value) else value)
                 for name, value in vars(self).items()}
        return SliceRows(**moved)


@dataclass
class AttentionProbe:
    """What one forward call asks of the attention layers, and where the answers land.

    export: {layer_idx: "rows" | "mean"}: layers that return their visual slice in `slices`.
    align: {layer_idx: teacher slice (B, query_len, visual_len)}: layers that compute the fused cosine
        loss Σ w·(1 − cos) / Σ w against it, stored in `losses`.
    intervene: {layer_idx: teacher slice (B, query_len, visual_len)}: on rows with row_weight > 0 every
        head's probabilities over the visual keys become (1 − mix)·P + mix·teacher, and the row is
        renormalised to sum to 1. Forms the full (B, H, L, L) probabilities: for analysis, not training.
    """

    rows: SliceRows
    export: dict = field(default_factory=dict)
    align: dict = field(default_factory=dict)
    intervene: dict = field(default_factory=dict)
    mix: float = 0.5
    eps: float = 1e-8
    slices: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)

    def __post_init__(self):
        for layer, reduce in self.export.items():
            if reduce not in ("rows", "mean"):
                raise ValueError(f"export: layer {layer} asks for reduce={reduce!r}, expected 'rows' or 'mean'")
        asked = [set(self.export), set(self.align), set(self.intervene)]
        overlap = (asked[0] & asked[1]) | (asked[0] & asked[2]) | (asked[1] & asked[2])
        if overlap:
            raise ValueError(f"export/align/intervene: layers {sorted(overlap)} are asked for more than one")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix: expected a weight in [0, 1], got {self.mix!r}")

    @property
    def layers(self) -> set:
        return set(self.export) | set(self.align) | set(self.intervene)


def compodistill_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           sliding_window=None, compodistill_probe: AttentionProbe | None = None, **kwargs):
    """transformers attention function: query (B, Hq, L, D), key/value (B, Hkv, L, D) → (B, L, Hq, D)."""
    if dropout:
        raise ValueError(f"dropout: compodistill attention has no attention dropout, got {dropout}")
    if sliding_window is not None:
        raise ValueError("sliding_window: compodistill attention is full causal attention; "
                         "disable use_sliding_window in the model config")
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(f"attention_mask: compodistill attention takes a (B, L) padding mask, got shape "
                         f"{tuple(attention_mask.shape)}")
    backend = getattr(module, "compodistill_backend", "auto")
    layer = getattr(module, "layer_idx", None)
    probe = compodistill_probe
    asked = probe is not None and layer in probe.layers

    if query.shape[2] != key.shape[2]:
        # Decoding with a KV cache: a few new queries against a longer cache. No slices exist here.
        if asked:
            raise ValueError(f"compodistill_probe: layer {layer} was asked for a slice during cached decoding")
        return _cached_decode_attention(query, key, value, attention_mask, scaling), None

    common = dict(causal=True, softmax_scale=scaling, key_padding_mask=attention_mask, backend=backend)
    if not asked and backend != "triton" and query.device.type == "cpu":
        # No slice wanted from this layer: on the CPU, PyTorch's fused SDPA kernel is several times faster
        # than the blockwise, checkpointed reference (which exists for the slices); same semantics.
        return _sdpa_causal_attention(query, key, value, attention_mask, scaling), None
    if not asked:
        out, _ = flash_attention(query, key, value, **common)
        return out.transpose(1, 2), None
    rows = probe.rows
    if query.shape[0] != rows.batch_size:
        raise ValueError(f"compodistill_probe: rows are for batch {rows.batch_size}, "
                         f"layer {layer} sees batch {query.shape[0]}")
    span = rows.kernel_arguments()
    if layer in probe.intervene:
        out = _intervened_attention(query, key, value, attention_mask, scaling, rows, probe.intervene[layer],
                                    probe.mix)
        return out.transpose(1, 2), None
    if layer in probe.align:
        out, loss = attention_with_alignment(query, key, value, probe.align[layer], eps=probe.eps,
                                             **span, **common)
        probe.losses[layer] = loss
    else:
        out, slc = attention_with_visual_slice(query, key, value, reduce=probe.export[layer], **span, **common)
        probe.slices[layer] = slc
    return out.transpose(1, 2), None


def _sdpa_causal_attention(query, key, value, padding, scaling):
    """Causal attention with a (B, L) key padding mask through SDPA, (B, L, Hq, D). A row with no allowed
    key (a left-padding row) gives 0, as the compodistill kernels do, instead of SDPA's NaN."""
    length = query.shape[2]
    groups = query.shape[1] // key.shape[1]
    if padding is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=groups > 1)
        return out.transpose(1, 2)
    positions = torch.arange(length, device=query.device)
    allowed = (positions[None, :] <= positions[:, None])[None] & padding[:, None, :].bool()  # (B, L, L)
    empty = ~allowed.any(dim=-1)                                                         # (B, L)
    # An empty row attends to its own key (finite, no NaN), and its output is then zeroed.
    allowed = allowed | (empty[:, :, None] & torch.eye(length, dtype=torch.bool, device=query.device)[None])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], scale=scaling,
                                         enable_gqa=groups > 1)
    out = out.masked_fill(empty[:, None, :, None], 0.0)
    return out.transpose(1, 2)


def _cached_decode_attention(query, key, value, padding, scaling):
    # Query i of q_len sits at cache position kv_len − q_len + i and sees keys up to there.
    q_len, kv_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    allowed = torch.arange(kv_len, device=query.device)[None, :] <= rows
    allowed = allowed[None, None]
    if padding is not None:
        allowed = allowed & padding[:, None, None, -kv_len:]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2)


def _intervened_attention(query, key, value, padding, scaling, rows: SliceRows, teacher, mix):
    B, H, L, D = query.shape
    groups = H // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * (scaling or D ** -0.5)
    allowed = torch.ones(L, L, dtype=torch.bool, device=query.device).tril()[None, None]
    if padding is not None:
        allowed = allowed & padding[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    query_positions, visual_positions = rows.query_positions(), rows.visual_positions()
    for b in range(B):
        weight = (torch.ones(rows.num_query, device=query.device) if rows.row_weight is None
                  else rows.row_weight[b])
        chosen = ((weight > 0) & (query_positions[b] >= 0)).nonzero().flatten()
        columns = (visual_positions[b] >= 0).nonzero().flatten()
        keys = visual_positions[b, columns]
        block = probs[b][:, query_positions[b, chosen]]          # (H, n, L)
        visual = block[..., keys]
        mixed = (1 - mix) * visual + mix * teacher[b][chosen][:, columns].float()[None]
        # Renormalise: the row keeps its text-key mass, and the visual mass becomes the mixed one.
        total = block.sum(-1, keepdim=True) - visual.sum(-1, keepdim=True) + mixed.sum(-1, keepdim=True)
        block = block.clone()
        block[..., keys] = mixed
        probs[b][:, query_positions[b, chosen]] = block / total.clamp_min(1e-12)
    return torch.matmul(probs, value.float()).to(query.dtype)


def compodistill_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """Mask function for the "compodistill" name: the (B, kv_length) bool padding mask, or None when
    nothing is padded. Causality is applied inside the kernels."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is not None and mask_function is not causal_mask_function:
        raise ValueError("attention_mask: compodistill attention supports plain causal attention with a "
                         "padding mask (no packed sequences, sliding windows or custom mask functions)")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if bool(attention_mask.all()) else attention_mask


def register_compodistill_attention():
    """Register the attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, compodistill_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, compodistill_mask)


def language_model_attention_modules(model):
    """The self-attention modules of the language model (those with a `layer_idx`)."""
    lm = parts.language_model(model)
    return [m for m in lm.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]


def enable_compodistill_attention(model, backend: str = "auto"):
    """Run every language-model layer of `model` (a LLaVA or a causal LM) on compodistill_kernels.

    backend: "auto" (Triton on CUDA tensors, the PyTorch path otherwise), "triton" or "torch".
    The vision tower keeps its attention implementation. Returns the model.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    register_compodistill_attention()
    base = parts.unwrap_peft(model)
    if hasattr(base.config, "text_config"):
        base.set_attn_implementation({"text_config": ATTENTION_NAME})
    else:
        base.set_attn_implementation(ATTENTION_NAME)
    modules = language_model_attention_modules(base)
    if not modules:
        raise ValueError("model: found no attention modules with a layer_idx in its language model")
    for module in modules:
        module.compodistill_backend = backend
    return model


def num_language_model_layers(model) -> int:
    return parts.text_config(model).num_hidden_layers
