"""Build a tiny, randomly initialised InternVL checkpoint in the real `-hf` on-disk format.

Used by the tests and the CPU quickstart of `grpo_internvl.py` (no hub access needed):

    python -m common.internvl_tiny --out tiny-models/internvl

Everything is written by the same `save_pretrained` calls that produce the real
OpenGVLab/InternVL3-*-hf checkpoints (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with the InternVL image tokens, preprocessor_config.json,
processor_config.json, chat_template.jinja), and loads back through
`InternVLForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained`.

The tokenizer is a byte-level BPE in the Qwen2 format, built offline with `tokenizers`.
`digits="grouped"` (default) pre-tokenizes numbers in runs of up to 3 digits (Llama-3 /
GPT-4 style) and holds every integer "0".."999" as one token; `digits="single"` splits
numbers into single digits exactly like the real Qwen2/Qwen2.5 tokenizer of InternVL3.
"""

import argparse
import itertools

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GotOcr2ImageProcessorFast,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    Qwen2TokenizerFast,
)

# Qwen2's pre-tokenizer regex; only the digit rule differs between the two variants.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|DIGITS| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# The chat template of the converted InternVL3 -hf checkpoints (image -> "<IMG_CONTEXT>\n").
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
# Words the prompts and the action template use; each becomes one BPE token.
WORDS = (
    "system user assistant action state open mm degrees x y z roll pitch yaw The What should robot "
    "take end effector is at push pick place the cube to goal region target and lift stack on top "
    "of a an it in"
).split()


def build_tokenizer(digits: str = "grouped") -> Qwen2TokenizerFast:
    """A byte-level BPE tokenizer in the Qwen2 format with a small hand-made vocabulary."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab, merges = {c: i for i, c in enumerate(sorted(byte_chars))}, []

    def add_word(word: str) -> None:  # add `word` with a left-to-right merge chain
        pieces = to_bytes.pre_tokenize_str(word)[0][0]
        for end in range(2, len(pieces) + 1):
            left, right = pieces[: end - 1], pieces[end - 1]
            if pieces[:end] not in vocab:
                vocab[pieces[:end]] = len(vocab)
                merges.append((left, right))

    for word in [" " + w for w in WORDS] + WORDS + [" -", "{", "}", ":", ",", "\n", ".", "?"]:
        add_word(word)
    if digits == "grouped":  # every "0".."999" reachable whatever merge fires first
        for a, b in itertools.product("0123456789", repeat=2):
            add_word(a + b)
        for a, b, c in itertools.product("0123456789", repeat=3):
            vocab[a + b + c] = len(vocab)
            merges += [(a + b, c), (a, b + c)]
    digit_rule = r"\p{N}{1,3}" if digits == "grouped" else r"\p{N}"

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT.replace("DIGITS", digit_rule)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        extra_special_tokens=IMAGE_TOKENS,
        model_max_length=4096,
    )


def build_tiny_internvl(out_dir: str, digits: str = "grouped", image_size: int = 56, seed: int = 0) -> str:
    """Write a tiny random InternVL checkpoint + processor to `out_dir` and return it."""
    tokenizer = build_tokenizer(digits)
    patches_per_side = image_size // 14
    image_seq_length = (patches_per_side // 2) ** 2  # pixel shuffle with downsample_ratio 0.5
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            image_size=[image_size, image_size], patch_size=[14, 14],
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            max_position_embeddings=4096, tie_word_embeddings=False,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
    )
    torch.manual_seed(seed)
    InternVLForConditionalGeneration(config).save_pretrained(out_dir)
    image_processor = GotOcr2ImageProcessorFast(
        size={"height": image_size, "width": image_size}, crop_to_patches=False,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
    )
    video_processor = InternVLVideoProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=image_processor.image_mean, image_std=image_processor.image_std,
    )
    processor = InternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        image_seq_length=image_seq_length, chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tiny-models/internvl", help="output directory")
    parser.add_argument("--digits", choices=["grouped", "single"], default="grouped",
                        help="'grouped': integers 0..999 are single tokens; 'single': Qwen2-style digits")
    cli = parser.parse_args()
    print(build_tiny_internvl(cli.out, cli.digits))
