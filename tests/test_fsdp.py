"""FSDP2 full fine-tuning on CPU/gloo with 2 ranks (common/fsdp.py), on the tiny OpenVLA and the tiny InternVL.

One `torchrun --nproc-per-node 2` launch of this file runs every check and writes their results as JSON; the tests
below read them. The sharded update is compared with a plain single-process update on the same global batch, each
rank holding an unsharded copy for reference.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_BINS = 256


# ---------------------------------------------------------------------------------------------------------------
# Worker (run by torchrun)
# ---------------------------------------------------------------------------------------------------------------
class TinyAgent(torch.nn.Module):
    """The pattern PPO's ActorCritic uses: a rollout method that calls the LM body directly and reads the LM head weight
    outside the head's forward, plus a teacher-forced training forward. The loss is the log-prob of the target bins."""

    def __init__(self, vla):
        super().__init__()
        self.vla = vla
        self.first = vla.vocab_size - NUM_BINS
        self.value_head = torch.nn.Linear(vla.hidden_size, 1)

    def bin_logits(self, hidden):
        return hidden @ self.vla.language_model.lm_head.weight[self.first : self.first + NUM_BINS].T

    def last_hidden(self, pixel_values, input_ids, attention_mask):
        embeds, mask, position_ids = self.vla.embed_multimodal(input_ids, attention_mask, pixel_values)
        lm_body = self.vla.language_model.model
        return lm_body(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).last_hidden_state[:, -1]

    @torch.no_grad()
    def act(self, pixel_values, input_ids, attention_mask):
        hidden = self.last_hidden(pixel_values, input_ids, attention_mask)
        return self.bin_logits(hidden), self.value_head(hidden)

    def forward(self, pixel_values, input_ids, attention_mask, targets):
        hidden = self.last_hidden(pixel_values, input_ids, attention_mask)
        logp = self.bin_logits(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        return -logp + self.value_head(hidden).squeeze(-1) ** 2  # (B,) per-sample loss


def _openvla_checks(model_dir: str, out_dir: str, rank: int, world: int) -> dict:
    import copy

    import torch.distributed as dist

    from common import fsdp
    from common.dist import check_in_sync
    from common.models.openvla import load_openvla, make_trainable, save_openvla

    def build(path):
        torch.manual_seed(0)
        vla, processor = load_openvla(path)
        make_trainable(vla, 0, 0)
        return TinyAgent(vla), processor

    agent, processor = build(model_dir)
    reference = copy.deepcopy(agent)  # the single-process run, on every rank
    unwrapped_keys = list(agent.state_dict())
    if rank == 1:  # shard_model starts every rank from rank 0's weights
        with torch.no_grad():
            agent.value_head.weight.add_(1.0)
    fsdp.shard_model(agent, reduce="sum", forward_methods=("act",))

    def optimizer_for(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)

    optimizer, ref_optimizer = optimizer_for(agent), optimizer_for(reference)
    gen = torch.Generator().manual_seed(1)
    G = 6  # global batch; rank 0 takes 4 samples, rank 1 takes 2 (uneven on purpose)
    pixel_values = torch.randn(G, 6, 224, 224, generator=gen)
    instructions = ["push the cube to the goal region", "pick up the cube"] * (G // 2)
    input_ids, attention_mask = processor.prompt_ids(instructions)
    targets = torch.randint(0, NUM_BINS, (G,), generator=gen)
    mine = torch.arange(0, 4) if rank == 0 else torch.arange(4, G)
    results = {}

    # 1. rollout before any training forward, a different number of calls per rank, inside gathered_params
    with torch.no_grad(), fsdp.gathered_params(agent):
        for _ in range(1 + rank):
            logits, value = agent.act(pixel_values[mine], input_ids[mine], attention_mask[mine])
    ref_logits, ref_value = reference.act(pixel_values[mine], input_ids[mine], attention_mask[mine])
    results["rollout_max_diff"] = max((logits - ref_logits).abs().max().item(), (value - ref_value).abs().max().item())
    lm_head_weight = agent.vla.language_model.lm_head.weight
    results["sharded_after_rollout"] = isinstance(lm_head_weight, torch.distributed.tensor.DTensor)

    def fsdp_step(model, opt, batch_rows):
        """loss = sum of per-sample losses / global count, micro-batches of 2, padded to equal counts."""
        opt.zero_grad(set_to_none=True)
        micro = list(batch_rows.split(2))
        for rows, weight in fsdp.even_micro_batches(micro, filler=batch_rows[:1]):
            loss = model(pixel_values[rows], input_ids[rows], attention_mask[rows], targets[rows]).sum() / G
            (weight * loss).backward()
        norm = fsdp.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        return norm.item()

    def reference_step():
        ref_optimizer.zero_grad(set_to_none=True)
        (reference(pixel_values, input_ids, attention_mask, targets).sum() / G).backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 1.0)
        ref_optimizer.step()
        return norm.item()

    def max_diff(full: dict, model) -> float:
        ref = model.state_dict()
        return max((full[k] - ref[k]).abs().max().item() for k in ref)

    # 2. one update equals the single-process update on the global batch
    norm = fsdp_step(agent, optimizer, mine)
    ref_norm = reference_step()
    results["grad_norm"], results["ref_grad_norm"] = norm, ref_norm
    full = fsdp.full_state_dict(agent)
    if rank == 0:
        results["keys_match_unwrapped"] = list(full) == unwrapped_keys
        results["update_max_diff"] = max_diff(full, reference)

    # 3. ranks agree: different local shards, identical gathered weights
    local = agent.vla.language_model.model.layers[0].mlp.up_proj.weight.to_local()
    everywhere = torch.distributed.checkpoint.state_dict.get_model_state_dict(
        agent, options=torch.distributed.checkpoint.state_dict.StateDictOptions(full_state_dict=True)
    )
    check_in_sync(list(everywhere.values()))  # raises if the gathered weights differ between ranks
    shards = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(shards, local.contiguous())
    results["ranks_agree"], results["shards_differ"] = True, not torch.equal(shards[0], shards[1])

    # 4. save (openvla layout + gathered optimizer) -> fresh sharded model -> one more step == continuing
    optim_state = fsdp.full_optimizer_state_dict(agent, optimizer)
    ckpt = os.path.join(out_dir, "openvla_ckpt")
    if rank == 0:
        save_openvla(agent.vla, processor, os.path.join(ckpt, "model"), state_dict=fsdp.sub_state_dict(full, "vla."))
        torch.save(
            {"value_head": fsdp.sub_state_dict(full, "value_head."), "optimizer": optim_state},
            os.path.join(ckpt, "trainer_state.pt"),
        )
    dist.barrier()
    fsdp_step(agent, optimizer, mine)
    continued = fsdp.full_state_dict(agent)

    resumed, _ = build(os.path.join(ckpt, "model"))
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True, mmap=True)
    resumed.value_head.load_state_dict(state["value_head"])
    fsdp.shard_model(resumed, reduce="sum", forward_methods=("act",))
    resumed_optimizer = optimizer_for(resumed)
    rank0_state = state["optimizer"] if rank == 0 else {}  # only rank 0 reads it; the shards are broadcast
    fsdp.load_full_optimizer_state_dict(resumed, resumed_optimizer, rank0_state, from_rank0=True)
    fsdp_step(resumed, resumed_optimizer, mine)
    after_resume = fsdp.full_state_dict(resumed)

    # 5. load_full_state_dict into a model sharded from other weights gives back the gathered state
    other, _ = build(model_dir)
    fsdp.shard_model(other, reduce="sum")
    fsdp.load_full_state_dict(other, full if rank == 0 else {}, from_rank0=True)
    reloaded = fsdp.full_state_dict(other)
    if rank == 0:
        results["resume_max_diff"] = max((continued[k] - after_resume[k]).abs().max().item() for k in continued)
        results["reload_max_diff"] = max((full[k] - reloaded[k]).abs().max().item() for k in full)
    return results


def _internvl_checks(model_dir: str, out_dir: str, rank: int) -> dict:
    import copy

    import torch.distributed as dist
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    from common import fsdp

    processor = AutoProcessor.from_pretrained(model_dir)
    model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    reference = copy.deepcopy(model)
    fsdp.shard_model(model, reduce="mean")  # per-rank token-means, averaged over ranks (DDP's rule)
    groups = sorted({type(m).__name__ for m in fsdp.fsdp_modules(model)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2)
    images = list(torch.randint(0, 256, (4, 3, 56, 56), generator=gen, dtype=torch.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "push the cube"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt] * 4, images=images, crop_to_patches=False, padding=True, return_tensors="pt")
    labels = inputs["input_ids"]

    def token_loss_sum(m, rows):
        out = m(
            input_ids=inputs["input_ids"][rows],
            attention_mask=inputs["attention_mask"][rows],
            pixel_values=inputs["pixel_values"][rows],
        )
        logp = out.logits[:, :-1].log_softmax(-1).gather(-1, labels[rows, 1:, None]).squeeze(-1)
        return -logp.sum()

    count = labels[:, 1:].numel()  # global token count; each rank holds half
    mine = torch.arange(2 * rank, 2 * rank + 2)
    (token_loss_sum(model, mine) / (count / 2)).backward()
    fsdp.clip_grad_norm_(list(model.parameters()), 1.0)
    optimizer.step()
    (token_loss_sum(reference, torch.arange(4)) / count).backward()
    torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
    ref_optimizer.step()
    full = fsdp.full_state_dict(model)
    results = {"groups": groups}
    if rank == 0:
        ref = reference.state_dict()
        results["update_max_diff"] = max((full[k] - ref[k]).abs().max().item() for k in ref)
        path = os.path.join(out_dir, "internvl_ckpt")
        model.save_pretrained(path, state_dict=full)
        loaded = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).state_dict()
        results["save_pretrained_max_diff"] = max((loaded[k] - ref[k]).abs().max().item() for k in ref)
    dist.barrier()
    return results


def _worker(openvla_dir: str, internvl_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, ROOT)
    from common.dist import init_dist

    info = init_dist()
    torch.set_num_threads(1)
    results = {"openvla": _openvla_checks(openvla_dir, out_dir, info.rank, info.world_size)}
    results["internvl"] = _internvl_checks(internvl_dir, out_dir, info.rank)
    if info.is_main:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdp_results(tiny_openvla, tmp_path_factory) -> dict:
    from common.models.tiny import make_tiny_internvl

    internvl = make_tiny_internvl(str(tmp_path_factory.mktemp("tiny_internvl")))
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        os.path.abspath(__file__),
        tiny_openvla,
        internvl,
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(out / "results.json") as f:
        return json.load(f)


def test_rollout_inside_gathered_params(fsdp_results):
    r = fsdp_results["openvla"]
    assert r["rollout_max_diff"] < 1e-5  # and ranks ran different numbers of forwards without hanging
    assert r["sharded_after_rollout"]


def test_fsdp_update_equals_single_process(fsdp_results):
    r = fsdp_results["openvla"]
    assert r["keys_match_unwrapped"]
    assert r["grad_norm"] == pytest.approx(r["ref_grad_norm"], rel=1e-5)
    assert r["update_max_diff"] < 1e-5


def test_ranks_agree(fsdp_results):
    assert fsdp_results["openvla"]["ranks_agree"] and fsdp_results["openvla"]["shards_differ"]


def test_save_resume_equals_continuing(fsdp_results):
    assert fsdp_results["openvla"]["resume_max_diff"] <= 1e-6
    assert fsdp_results["openvla"]["reload_max_diff"] == 0.0


def test_internvl(fsdp_results):
    r = fsdp_results["internvl"]
    assert {"Qwen2DecoderLayer", "InternVLVisionLayer", "InternVLForConditionalGeneration"} <= {
        name.removeprefix("FSDP") for name in r["groups"]
    }
    assert r["update_max_diff"] < 1e-5
    assert r["save_pretrained_max_diff"] < 1e-5


def test_use_fsdp_flag():
    sys.path.insert(0, ROOT)
    from common.fsdp import use_fsdp

    assert use_fsdp("auto", 0, 8) and not use_fsdp("auto", 32, 8) and not use_fsdp("auto", 0, 1)
    assert use_fsdp("on", 0, 1) and not use_fsdp("off", 0, 8)
    with pytest.raises(ValueError, match="--lora-rank"):
        use_fsdp("on", 32, 8)


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
