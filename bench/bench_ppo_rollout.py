"""Throughput and peak memory of the PPO rollout policy step (`ActorCritic.act`: prefill + 7 cached decodes).

    python bench/bench_ppo_rollout.py --size 7b --batch-sizes 16 64      # GPU: openvla-7b shapes, random weights
    python bench/bench_ppo_rollout.py --size tiny --batch-sizes 2 8      # CPU smoke run with the tiny model

The 7B model is built from the openvla-7b config (fused DINOv2 ViT-L + SigLIP SO400M, Llama-2 7B, vocab 32064)
with random bf16 weights, LoRA rank 32 injected as in training; nothing is downloaded.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.models.openvla import (  # noqa: E402
    ActionTokenizer,  # noqa: E402
    OpenVLA,
    OpenVLAProcessor,
    load_openvla,
    make_trainable,  # noqa: E402
)
from common.models.tiny import build_tiny_tokenizer, make_tiny_openvla, preprocessor_config  # noqa: E402
from ppo_openvla import ActorCritic  # noqa: E402

OPENVLA_7B = {
    "model_type": "openvla",
    "vision_backbone_id": "dinosiglip-vit-so-224px",
    "pad_to_multiple_of": 64,
    "n_action_bins": 256,
    "text_config": {"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-5, "pad_token_id": 32000},
}


def build(size: str, device: torch.device, tmp: str):
    if size == "tiny":
        vla, processor = load_openvla(make_tiny_openvla(os.path.join(tmp, "tiny")), device=device)
    else:
        with torch.device("meta"):
            vla = OpenVLA(OPENVLA_7B, "sdpa")
        vla = vla.to_empty(device=device).to(torch.bfloat16)
        with torch.no_grad():
            for p in vla.parameters():
                p.normal_(0, 0.02)
        vla.language_model.model.rotary_emb = type(vla.language_model.model.rotary_emb)(vla.language_model.config).to(
            device
        )
        processor = OpenVLAProcessor(build_tiny_tokenizer(os.path.join(tmp, "tok")), preprocessor_config())
    make_trainable(vla, 32, 16)
    return ActorCritic(vla, ActionTokenizer(vla.vocab_size, 256)).to(device).eval(), processor


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["tiny", "7b"], default="7b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        agent, processor = build(args.size, device, tmp)
        for batch in args.batch_sizes:
            prompt = processor.prompt_ids(["put the carrot on the plate"] * batch, device=device)
            images = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=device)
            with autocast:
                agent.act(processor.preprocess_images(images), *prompt, 1.0)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.iters):
                with autocast:
                    agent.act(processor.preprocess_images(images), *prompt, 1.0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            print(
                f"size={args.size} batch={batch}: {batch * args.iters / elapsed:.1f} actions/s, "
                f"{elapsed / args.iters * 1000:.1f} ms per step, peak GPU memory {peak:.2f} GiB"
            )


if __name__ == "__main__":
    main()
