"""An offline byte-level BPE tokenizer with a ChatML chat template, for the tiny presets.

Real runs take the tokenizer of the language model checkpoint. The tiny presets need one that can be
built with no download, deterministically, and that behaves like Qwen's: byte-level BPE (any text
encodes, nothing maps to an unknown token), `<|im_start|>`/`<|im_end|>` turns and `<|endoftext|>`
padding. Its merges are learned from a fixed word list that covers the vocabulary of the procedural
compositional-reasoning data, so those words are one or two tokens and sequences stay short.
"""
from __future__ import annotations

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|endoftext|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"

# Qwen's ChatML layout; like Qwen2's template, a system turn is written only when one is given.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = """
a an the is are was of to and or in on at with without by from for as it its this that there these those
what which who where how many much does do has have not no yes none some any all each every one two
three four five six seven eight nine ten zero more fewer than same different both neither either only
image picture photo scene caption describes describe best answer option letter question choose shown
object objects shape shapes color colour colors size small large big tiny medium left right above below
top bottom middle center next near far between behind front side under over beside
red green blue yellow purple orange pink brown black white gray grey cyan magenta
circle circles square squares triangle triangles star stars cross crosses diamond diamonds
hexagon hexagons ring rings heart hearts rectangle rectangles ellipse ellipses
count number total visible present exist exists contain contains containing
user assistant system please carefully short word single sentence using phrase
""".split()


def _training_corpus():
    # Each word alone and in a few fixed word orders, so that frequent bigrams inside words merge.
    lines = list(_WORDS)
    for shift in (0, 7, 19):
        rotated = _WORDS[shift:] + _WORDS[:shift]
        lines.append(" ".join(rotated))
    return lines * 4


def build_tiny_tokenizer(vocab_size: int = 1024):
    """Build the tiny presets' tokenizer (a `transformers` fast tokenizer), offline and deterministic.

    Special tokens: `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos) and `<image>`, the image
    placeholder that the processor expands to one token per visual patch.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size: expected an int >= 300 (256 bytes plus merges), got {vocab_size!r}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 3,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[PAD_TOKEN],
        show_progress=False,
    )
    backend.train_from_iterator(_training_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=TURN_END,
        additional_special_tokens=[TURN_START, TURN_END, IMAGE_TOKEN],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
