"""Conversations to token ids with the tokenizer's own chat template.

LLaVA data holds conversations as [{"from": "human" | "gpt" | "system", "value": text}, ...] with one
`<image>` placeholder in the first human turn. Here the placeholder is expanded to one image token per
visual patch, the turns are rendered by the tokenizer's chat template, and only the assistant turns
are supervised: every other token gets the label -100.
"""
from __future__ import annotations

from ..models.tokenizer import IMAGE_TOKEN

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSample(ValueError):
    """A sample that cannot be used, with its id and a short reason (a category for reports)."""

    def __init__(self, sample_id, reason: str, detail: str = ""):
        self.sample_id, self.reason, self.detail = sample_id, reason, detail
        super().__init__(f"sample {sample_id!r}: {reason}" + (f" ({detail})" if detail else ""))


def to_messages(conversations, sample_id=None) -> list[dict]:
    """LLaVA turns → chat-template messages [{"role", "content"}], checked for shape and emptiness."""
    if not isinstance(conversations, list) or not conversations:
        raise BadSample(sample_id, "empty conversation")
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise BadSample(sample_id, "malformed turn", f"expected {{'from': one of {sorted(ROLES)}, 'value': str}}, got {turn!r:.80}")
        if not turn["value"].strip():
            raise BadSample(sample_id, "empty turn", f"an empty {turn['from']!r} turn")
        messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadSample(sample_id, "no assistant turn")
    return messages


def expand_image_token(messages: list[dict], num_image_tokens: int, sample_id=None) -> list[dict]:
    """Replace the single `<image>` placeholder by `num_image_tokens` image tokens (LLaVA puts it in a
    user turn; it must appear exactly once in the conversation)."""
    count = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if count == 0:
        raise BadSample(sample_id, "no <image> token", "the sample has an image but no <image> placeholder")
    if count > 1:
        raise BadSample(sample_id, "several <image> tokens", f"{count} placeholders; one image per sample")
    return [{**m, "content": m["content"].replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens)} for m in messages]


def _encode(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(conversations, tokenizer, num_image_tokens: int, *, max_length: int | None = None,
                          sample_id=None, image: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one LLaVA conversation; labels are -100 except on assistant turns.

    The template is rendered one turn at a time: the tokens that turn i adds to the rendering of turns
    < i are that turn's tokens. For an assistant turn, the header that `add_generation_prompt` renders
    is left unsupervised; its content and end-of-turn tokens are supervised, so the model learns to stop.
    """
    messages = to_messages(conversations, sample_id)
    if image:
        messages = expand_image_token(messages, num_image_tokens, sample_id)
    elif any(IMAGE_TOKEN in m["content"] for m in messages):
        raise BadSample(sample_id, "<image> token without an image")
    input_ids, labels = [], []
    for i, message in enumerate(messages):
        full = _encode(tokenizer, messages[: i + 1])
        if full[: len(input_ids)] != input_ids:
            raise ValueError("tokenizer: its chat template does not render conversations turn by turn "
                             "(a prefix of the conversation is not a prefix of its rendering)")
        if message["role"] == "assistant":
            header = _encode(tokenizer, messages[:i], add_generation_prompt=True)
            if full[: len(header)] != header:
                raise ValueError("tokenizer: the chat template's generation prompt is not a prefix of the "
                                 "rendered assistant turn")
            labels += [IGNORE_INDEX] * (len(header) - len(input_ids)) + full[len(header):]
        else:
            labels += [IGNORE_INDEX] * (len(full) - len(input_ids))
        input_ids = full
    if max_length is not None and len(input_ids) > max_length:
        raise BadSample(sample_id, "too long", f"{len(input_ids)} tokens > max_length {max_length}")
    return input_ids, labels


def encode_prompt(question: str, tokenizer, num_image_tokens: int, *, image: bool = True,
                  system: str | None = None) -> list[int]:
    """Token ids of a single user question (with the image in front, LLaVA style) followed by the
    assistant header, ready for scoring or generation."""
    content = f"{IMAGE_TOKEN * num_image_tokens}\n{question}" if image else question
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return _encode(tokenizer, messages, add_generation_prompt=True)
