"""Tokens/s of grpo_internvl.py's constrained decoding vs `model.generate` with a constraining logits processor.

    python bench/bench_grpo_decoding.py                                # tiny InternVL on CPU, batches 4 and 16
    python bench/bench_grpo_decoding.py --digits single --batch-sizes 64

Both sample the same action template under the same constraint and temperature, from the same model and the same
batch of prompts and images. `generate_actions` feeds each forced run of the template together with the previously
sampled token (one cached forward per free slot); `model.generate` takes one cached forward per answer token and
masks the logits with a LogitsProcessor. Tokens/s counts every answer token (forced and free); every answer of both
is checked to parse.
"""

import argparse
import os
import sys
import tempfile
import time

import torch
from transformers import AutoProcessor, InternVLForConditionalGeneration, LogitsProcessor, LogitsProcessorList

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo_internvl as grpo  # noqa: E402
from common.models.tiny import make_tiny_internvl  # noqa: E402


class TemplateLogitsProcessor(LogitsProcessor):
    """Allow, at answer position i, only the template's forced token or the slot's allowed set."""

    def __init__(self, template: grpo.ActionTemplate, prompt_len: int, vocab_size: int):
        allowed = []
        for f in range(template.num_free):
            k = template.free_set[f]
            allowed += [[t] for t in template.forced[f]] + [template.set_ids[k][template.set_valid[k]].tolist()]
        allowed += [[t] for t in template.forced[-1]]
        self.bias = torch.full((len(allowed), vocab_size), -float("inf"))
        for i, ids in enumerate(allowed):
            self.bias[i, ids] = 0.0
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores + self.bias[input_ids.size(1) - self.prompt_len].to(scores.device)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default=None, help="an InternVL -hf checkpoint (default: build the tiny one)")
    parser.add_argument("--digits", choices=["grouped", "single"], default="grouped", help="tiny tokenizer variant")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--iters", type=int, default=11, help="timed repeats (the median is reported)")
    parser.add_argument("--temperature", type=float, default=1.6)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_path or make_tiny_internvl(os.path.join(tmp, "internvl"), digits=args.digits)
        processor, template = grpo.load_processor_and_template(path)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = InternVLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        tokenizer = AutoProcessor.from_pretrained(path).tokenizer
        for batch in args.batch_sizes:
            rgb = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8)
            tcp_pose = torch.tensor([[0.1, 0.0, 0.2, 0.0, 1.0, 0.0, 0.0]]).expand(batch, -1)
            inputs = grpo.build_inputs(processor, ["push the cube to the goal region"] * batch, rgb, tcp_pose, device)
            constraint = TemplateLogitsProcessor(
                template, inputs["input_ids"].size(1), model.config.text_config.vocab_size
            )

            def ours():
                return template.assemble(
                    grpo.generate_actions(model, inputs, template, args.temperature, 0, 1.0).tokens
                )

            def hf_generate():
                out = model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=args.temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=template.answer_len,
                    min_new_tokens=template.answer_len,
                    logits_processor=LogitsProcessorList([constraint]),
                    pad_token_id=tokenizer.pad_token_id,
                )
                return out[:, inputs["input_ids"].size(1) :]

            results = {}
            for name, fn in (("constrained generate_actions", ours), ("model.generate + LogitsProcessor", hf_generate)):
                answers = fn()  # warm-up, and check that every answer parses
                for answer in answers:
                    grpo.parse_action_text(tokenizer.decode(answer))
                times = []
                for _ in range(args.iters):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                median = sorted(times)[len(times) // 2]  # robust to other processes sharing the CPU
                results[name] = batch * template.answer_len / median
                print(
                    f"batch {batch:4d} {name:34s} {results[name]:9.1f} tokens/s "
                    f"(median {median * 1000:.1f} ms per action batch of {template.answer_len} tokens/answer)"
                )
            ours_tps, hf_tps = results.values()
            print(f"batch {batch:4d} speed-up {ours_tps / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
