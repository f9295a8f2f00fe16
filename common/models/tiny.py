"""Tiny random checkpoints in the real on-disk formats, for the tests and the CPU quickstarts (no hub access).

    python -m common.models.tiny openvla tiny-models/openvla   # openvla-7b layout (also loads as an OFT policy)
    python -m common.models.tiny internvl tiny-models/internvl # InternVL3 `-hf` layout (save_pretrained)
    python -m common.models.tiny vjepa2 tiny-models/vjepa2     # V-JEPA 2 (save_pretrained)

Each is written by the same code path that writes or reads the real checkpoints (common/models/openvla.py's
`save_openvla`, transformers' `save_pretrained`), so loading one exercises the real loaders.

The InternVL tokenizer is a byte-level BPE in the Qwen2 format, built offline with `tokenizers`.
`digits="grouped"` (default) pre-tokenizes numbers in runs of up to 3 digits (Llama-3 / GPT-4 style) and holds
every integer "0".."999" as one token, saved as a generic `tokenizers` tokenizer (transformers loads the
tokenizer.json pipeline as written); `digits="single"` splits numbers into single digits exactly like the real
Qwen2/Qwen2.5 tokenizer of InternVL3 and is saved as a `Qwen2Tokenizer` (transformers 5 rebuilds that class's own
pre-tokenizer on load, the one real InternVL3 checkpoints get).
"""

import argparse
import itertools
import json
import os
from typing import Optional

import torch
import torch.nn as nn
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
)

from common.models.openvla import (
    PROMPT,
    VISION_BACKBONES,
    OpenVLA,
    OpenVLAProcessor,
    read_tokenizer_files,
    save_openvla,
)


# ---------------------------------------------------------------------------------------------------------------
# OpenVLA: random weights, offline sentencepiece tokenizer
# ---------------------------------------------------------------------------------------------------------------
def preprocessor_config(image_size: int = 224) -> dict:
    """openvla-7b's preprocessor_config.json (DINOv2 then SigLIP constants, rounded to bf16 as the reference has
    them)."""
    resize = {"antialias": True, "interpolation": 3, "max_size": None, "size": [image_size, image_size]}
    return {
        "auto_map": {
            "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
            "AutoProcessor": "processing_prismatic.PrismaticProcessor",
        },
        "image_processor_type": "PrismaticImageProcessor",
        "processor_class": "PrismaticProcessor",
        "image_resize_strategy": "resize-naive",
        "use_fused_vision_backbone": True,
        "input_sizes": [[3, image_size, image_size]] * 2,
        "interpolations": ["bicubic", "bicubic"],
        "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
        "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
        "tvf_crop_params": [{"output_size": [image_size, image_size]}] * 2,
        "tvf_do_letterbox": False,
        "tvf_letterbox_fill": None,
        "tvf_normalize_params": [
            {
                "inplace": False,
                "mean": [0.484375, 0.455078125, 0.40625],
                "std": [0.228515625, 0.2236328125, 0.224609375],
            },
            {"inplace": False, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        ],
        "tvf_resize_params": [resize, resize],
    }


def build_tiny_tokenizer(out_dir: str, vocab_size: int = 1024):
    """A Llama-format sentencepiece BPE tokenizer (byte fallback, <unk>/<s>/</s>, "<PAD>" added) trained offline on
    robot instructions, so its last 256 pieces can serve as action tokens exactly as in openvla-7b."""
    import random

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    rng = random.Random(0)
    words = " ".join(PROMPT.format(t) for t in _TINY_CORPUS).split()
    syllables = [
        "ka",
        "lo",
        "mi",
        "ne",
        "ru",
        "ta",
        "so",
        "pi",
        "de",
        "vu",
        "ba",
        "go",
        "ze",
        "fi",
        "wo",
        "xu",
        "ly",
        "qe",
    ]
    lines = [PROMPT.format(t) for t in _TINY_CORPUS] * 20
    lines += [chr(0x4E00 + i) for i in range(300)]  # rare characters take the last ids, as in Llama-2's vocabulary
    for _ in range(4000):
        pseudo = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6)]
        lines.append(" ".join(rng.sample(words, 4) + pseudo))
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        add_dummy_prefix=True,
        num_threads=1,
        minloglevel=2,
    )
    # The files openvla-7b ships: the sentencepiece tokenizer.model (transformers converts it on load), its
    # tokenizer_config.json, and "<PAD>" as an added token right after the vocabulary.
    os.replace(prefix + ".model", os.path.join(out_dir, "tokenizer.model"))
    os.remove(prefix + ".vocab")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_bos_token": True,
        "add_eos_token": False,
        **{"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<PAD>"},
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "added_tokens.json"), "w") as f:
        json.dump({"<PAD>": vocab_size}, f)
    return LlamaTokenizer.from_pretrained(out_dir)


_TINY_CORPUS = [
    "push the cube to the goal region",
    "pick up the cube and move it to the goal position",
    "stack the red cube on top of the green cube",
    "pull the cube to the goal region",
    "put the carrot on the plate",
    "put the spoon on the towel",
    "put eggplant into yellow basket",
    "open the top drawer and put the bowl inside",
    "turn on the stove",
    "put the black bowl on the plate",
    "pick up the alphabet soup and place it in the basket",
    "lift the peg and stand it upright",
    "insert the peg into the hole on the side of the box",
    "place the sphere into the bin",
]


def make_tiny_openvla(
    out_dir: str,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_dim: int = 32,
    norm_stats: Optional[dict] = None,
) -> str:
    """Write a random tiny OpenVLA (fused DINOv2 + SigLIP ViTs, Llama) in the openvla-7b on-disk layout."""
    tokenizer = build_tiny_tokenizer(out_dir)
    tokenizer_vocab = tokenizer.vocab_size  # without the added <PAD>, like 32000 for openvla-7b
    pad_to = 64
    lm_vocab = (tokenizer_vocab + 1 + pad_to - 1) // pad_to * pad_to
    vit = dict(embed_dim=vision_dim, depth=3, num_heads=2)
    config = {
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        },
        "model_type": "openvla",
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "image_sizes": [224, 224],
        "timm_model_ids": VISION_BACKBONES["dinosiglip-vit-so-224px"][0],
        "timm_override_act_layers": [None, None],
        "timm_model_overrides": [vit, vit],
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "llm_max_length": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "pad_to_multiple_of": pad_to,
        "n_action_bins": 256,
        "norm_stats": norm_stats
        or {
            "maniskill": {
                "action": {
                    "q01": [-1.0] * 6 + [0.0],
                    "q99": [1.0] * 6 + [1.0],
                    "mask": [True] * 6 + [False],
                    "mean": [0.0] * 7,
                    "std": [1.0] * 7,
                    "min": [-1.0] * 7,
                    "max": [1.0] * 7,
                }
            }
        },
        "text_config": {
            "model_type": "llama",
            "vocab_size": lm_vocab,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "pad_token_id": tokenizer.pad_token_id,
            "torch_dtype": "float32",
        },
        "torch_dtype": "float32",
        "transformers_version": "4.40.1",
    }
    torch.manual_seed(seed)
    model = OpenVLA(config)
    for name, p in model.named_parameters():  # timm inits LayerScale to 1e-5; make the tiny vision path matter
        if name.endswith(".gamma"):
            nn.init.uniform_(p, 0.5, 1.0)
    processor = OpenVLAProcessor(tokenizer, preprocessor_config(), read_tokenizer_files(out_dir))
    save_openvla(model, processor, out_dir, max_shard_bytes=1 << 20)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# InternVL (-hf): random weights, offline Qwen2-format tokenizer
# ---------------------------------------------------------------------------------------------------------------
# Qwen2's pre-tokenizer regex; only the digit rule differs between the two variants.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|DIGITS| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
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


def build_tokenizer(digits: str = "grouped") -> PreTrainedTokenizerFast:
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
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT.replace("DIGITS", digit_rule)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(ADDED_TOKENS)
    tokenizer_class = PreTrainedTokenizerFast if digits == "grouped" else Qwen2Tokenizer
    return tokenizer_class(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        additional_special_tokens=ADDED_TOKENS[3:],
        extra_special_tokens=IMAGE_TOKENS,
        model_max_length=4096,
    )


def make_tiny_internvl(out_dir: str, digits: str = "grouped", image_size: int = 56, seed: int = 0) -> str:
    """Write a tiny random InternVL checkpoint + processor to `out_dir` and return it."""
    tokenizer = build_tokenizer(digits)
    patches_per_side = image_size // 14
    image_seq_length = (patches_per_side // 2) ** 2  # pixel shuffle with downsample_ratio 0.5
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=[image_size, image_size],
            patch_size=[14, 14],
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
        tie_word_embeddings=False,  # transformers 5 reads the top-level flag (its default: tied)
    )
    torch.manual_seed(seed)
    InternVLForConditionalGeneration(config).save_pretrained(out_dir)
    image_processor = GotOcr2ImageProcessor(
        size={"height": image_size, "width": image_size},
        crop_to_patches=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )
    video_processor = InternVLVideoProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=image_seq_length,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# V-JEPA 2
# ---------------------------------------------------------------------------------------------------------------
def make_tiny_vjepa2(out_dir: str, hidden_size: int = 48, crop_size: int = 32, seed: int = 0) -> str:
    """A random tiny V-JEPA 2 in the real save_pretrained layout, for tests and the CPU quickstart."""
    from transformers import VJEPA2Config, VJEPA2Model

    config = VJEPA2Config(
        crop_size=crop_size,
        image_size=crop_size,
        frames_per_clip=16,
        patch_size=16,
        tubelet_size=2,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2.0,
        pred_hidden_size=32,
        pred_num_hidden_layers=1,
        pred_num_attention_heads=4,
        num_pooler_layers=1,
    )
    torch.manual_seed(seed)
    VJEPA2Model(config).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a tiny random checkpoint in the real on-disk format.")
    parser.add_argument("kind", choices=["openvla", "internvl", "vjepa2"])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits", choices=["grouped", "single"], default="grouped", help="InternVL tokenizer digits")
    cli = parser.parse_args()
    if cli.kind == "openvla":
        print(make_tiny_openvla(cli.out_dir, seed=cli.seed))
    elif cli.kind == "internvl":
        print(make_tiny_internvl(cli.out_dir, cli.digits, seed=cli.seed))
    else:
        print(make_tiny_vjepa2(cli.out_dir, seed=cli.seed))
