"""One update on a real rollout moves the policy the way the advantages say, for all three algorithms.

Each test rolls out two episodes (or envs) on the real simulator with a tiny random model, gives every sample of
one of them advantage +1 and of the other -1, runs ONE optimizer step through the script's own update code, then
recomputes the log-probs with the script's training forward: the summed log-prob of the executed action tokens
must rise for the + episode and fall for the - one. A sign error anywhere in the loss, the advantage broadcast or
the token mask fails this; the unit tests of the loss formulas alone would not see a mask that selects the wrong
tokens or an advantage paired with the wrong sample.
"""

import contextlib

import torch

from common.guards import NonFiniteGuard

LEARNING_RATE = 1e-3  # large enough that one Adam step moves a tiny random model measurably


def assert_moved_with_advantage(before: torch.Tensor, after: torch.Tensor, advantages: torch.Tensor) -> None:
    """before/after (E,) summed log-probs of each episode's executed tokens; advantages (E,) of +1/-1."""
    change = after - before
    assert ((change > 0) == (advantages > 0)).all(), f"log-prob change {change.tolist()} vs advantages {advantages}"
    assert change.abs().min() > 1e-3, change  # a real step, not float noise


# ---------------------------------------------------------------------------------------------------------------
# PPO (ppo_openvla.py): ActorCritic.act on ManiSkill PushCube, ppo_losses, one AdamW step
# ---------------------------------------------------------------------------------------------------------------
def test_ppo_update_follows_advantages(tiny_openvla):
    from common.envs.maniskill import ManiSkillVLAEnv
    from common.models.openvla import ActionTokenizer, action_stats, load_openvla, make_trainable, read_openvla_config
    from ppo_openvla import ActorCritic, ppo_losses

    torch.manual_seed(0)
    vla, processor = load_openvla(tiny_openvla)
    make_trainable(vla, lora_rank=0, lora_alpha=16)
    tokenizer = ActionTokenizer(vla.vocab_size, vla.n_action_bins)
    stats = action_stats(read_openvla_config(tiny_openvla), None)
    policy = ActorCritic(vla, tokenizer)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(policy.vla.parameters()), "lr": LEARNING_RATE},
            {"params": list(policy.value_head.parameters()), "lr": LEARNING_RATE},
        ],
        eps=1e-5,
        weight_decay=0.0,
    )
    T, N, temperature = 4, 2, 1.0
    env = ManiSkillVLAEnv("PushCube-v1", N, image_size=64, dense_reward=True, max_episode_steps=T)
    try:
        obs = env.reset([11, 12])
        prompt_ids, prompt_mask = processor.prompt_ids(env.instructions)
        pixels, tokens, logprobs, values = [], [], [], []
        policy.eval()
        for _ in range(T):
            pixel_values = processor.preprocess_images(obs["rgb"])
            token, logprob, value = policy.act(pixel_values, prompt_ids, prompt_mask, temperature)
            pixels.append(pixel_values)
            tokens.append(token)
            logprobs.append(logprob)
            values.append(value)
            normalized = tokenizer.tokens_to_normalized(token).float()
            obs, _, _, _, _ = env.step(ActionTokenizer.unnormalize(normalized, stats))
    finally:
        env.close()
    b_pixels, b_tokens = torch.cat(pixels), torch.cat(tokens)  # (T * N, ...), (T * N, 7): step-major, like the script
    b_logprobs, b_values = torch.cat(logprobs), torch.cat(values)  # (T * N,)
    b_env = torch.arange(N).repeat(T)  # (T * N,)
    episode_adv = torch.tensor([1.0, -1.0])
    b_advantages = episode_adv[b_env]

    def episode_logprobs() -> torch.Tensor:
        with torch.no_grad():
            logprob, _, _ = policy(b_pixels, prompt_ids[b_env], prompt_mask[b_env], b_tokens, temperature)
        return torch.zeros(N).index_add_(0, b_env, logprob)  # (N,) summed over each env's steps

    before = episode_logprobs()
    torch.testing.assert_close(before, torch.zeros(N).index_add_(0, b_env, b_logprobs), atol=1e-4, rtol=0)
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    new_logprob, _, new_value = policy(b_pixels, prompt_ids[b_env], prompt_mask[b_env], b_tokens, temperature)
    pg_loss, v_loss, _, _ = ppo_losses(
        new_logprob,
        b_logprobs,
        b_advantages,
        new_value,
        b_values,
        b_values,
        clip_coef=0.2,
        value_clip=0.2,
        huber_delta=10.0,
    )
    (pg_loss + v_loss).backward()
    optimizer.step()
    assert_moved_with_advantage(before, episode_logprobs(), episode_adv)


# ---------------------------------------------------------------------------------------------------------------
# GRPO (grpo_internvl.py): rollout on ManiSkill PushCube, update_policy, free_slot_logits
# ---------------------------------------------------------------------------------------------------------------
def test_grpo_update_follows_advantages(tmp_path):
    import grpo_internvl as grpo
    from common.envs.maniskill import ManiSkillVLAEnv
    from common.models.action_text import build_inputs, load_processor_and_template
    from common.models.tiny import make_tiny_internvl

    model_path = make_tiny_internvl(str(tmp_path / "internvl"))
    args = grpo.Args(
        model_path=model_path,
        lora_rank=0,
        num_envs=2,
        group_size=2,
        max_episode_steps=3,
        image_size=64,
        learning_rate=LEARNING_RATE,
        num_minibatches=1,
        micro_batch_size=8,
    )
    processor, template = load_processor_and_template(model_path)
    torch.manual_seed(0)
    policy = grpo.load_policy(args, torch.device("cpu"), None)
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=0.0
    )
    autocast = contextlib.nullcontext()
    envs = ManiSkillVLAEnv(
        "PushCube-v1", args.num_envs, image_size=args.image_size, max_episode_steps=args.max_episode_steps
    )
    try:
        policy.eval()
        batch = grpo.rollout(policy, processor, template, envs, [7, 7], args, autocast)  # one group of 2
    finally:
        envs.close()
    step_idx, env_idx = batch.alive.nonzero(as_tuple=True)  # (M,) every generated step
    weights = grpo.episode_weights(batch.length, torch.ones(2, dtype=torch.bool), args.loss_agg_mode)
    samples = grpo.Samples(step_idx, env_idx, torch.tensor([1.0, -1.0]), weights)  # advantages (N,)

    def episode_logprobs() -> torch.Tensor:
        t, n = samples.step_idx, samples.env_idx
        inputs = build_inputs(
            processor, [batch.instructions[i] for i in n], batch.rgb[t, n], batch.tcp_pose[t, n], "cpu"
        )
        with torch.no_grad():
            logits = grpo.free_slot_logits(policy, inputs, template.assemble(batch.tokens[t, n]), template)
        logp = grpo.policy_logprobs(logits, batch.support[t, n], args.temperature)  # (M, F, S)
        per_step = logp.gather(2, batch.choices[t, n][..., None]).squeeze(2).sum(1)  # (M,)
        return torch.zeros(args.num_envs).index_add_(0, n, per_step)  # (N,)

    policy.eval()
    before = episode_logprobs()
    alive = batch.alive[..., None].expand_as(batch.logprobs)
    rollout_sum = (batch.logprobs * alive).sum((0, 2))  # (N,)
    torch.testing.assert_close(before, rollout_sum, atol=1e-3, rtol=0)
    metrics = grpo.update_policy(
        policy, optimizer, processor, template, batch, samples, args, autocast, NonFiniteGuard()
    )
    assert metrics["actor/grad_norm"] > 0
    policy.eval()
    assert_moved_with_advantage(before, episode_logprobs(), samples.advantages)


# ---------------------------------------------------------------------------------------------------------------
# SRPO (srpo_openvla_oft.py): rollout on LIBERO libero_spatial task 0, update_policy, OFTPolicy forward
# ---------------------------------------------------------------------------------------------------------------
def test_srpo_update_follows_advantages(tiny_oft):
    import srpo_openvla_oft as srpo
    from common.envs.libero import LiberoVectorEnv, configure_rendering, to_libero_actions
    from common.models.openvla import ActionTokenizer, load_openvla, make_trainable

    args = srpo.Args(
        model_path=tiny_oft,
        suite="libero_spatial",
        task_ids=[0],
        num_envs=2,
        group_size=2,
        tasks_per_iteration=1,
        max_episode_steps=16,
        camera_size=64,
        lora_rank=0,
        learning_rate=LEARNING_RATE,
        micro_batch_size=4,
        env_workers=False,
    )
    configure_rendering(None)
    torch.manual_seed(0)
    vla, processor = load_openvla(tiny_oft, attn_implementation="sdpa")
    stats = srpo.load_action_stats(tiny_oft, vla.config, args.suite, None)
    make_trainable(vla, args.lora_rank, args.lora_alpha)
    policy = srpo.OFTPolicy(vla, processor.tokenizer.eos_token_id).eval()
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=0.0
    )
    tokenizer = ActionTokenizer(vla.vocab_size, srpo.N_BINS)
    autocast = contextlib.nullcontext()

    def env_action(bins):
        return to_libero_actions(srpo.bins_to_actions(bins, policy, tokenizer, stats))

    envs = LiberoVectorEnv(
        args.suite,
        args.num_envs,
        camera_size=args.camera_size,
        max_steps=args.max_episode_steps,
        use_workers=False,
        seed=args.seed,
    )
    try:
        batch, _ = srpo.rollout(policy, processor, env_action, envs, [(0, 0), (0, 0)], args, autocast)
    finally:
        envs.close()
    query_idx, episode_idx = batch.token_mask.any(-1).nonzero(as_tuple=True)  # (M,)
    samples = srpo.Samples(query_idx, episode_idx, torch.tensor([1.0, -1.0]))  # advantages (R,)
    assert len(query_idx) == 4  # 2 episodes x 16 steps / 8-step chunks

    def episode_logprobs() -> torch.Tensor:
        q, r = samples.query_idx, samples.episode_idx
        prompt_ids, prompt_mask = processor.prompt_ids([batch.instructions[i] for i in r])
        with torch.no_grad():
            logits = policy(prompt_ids, prompt_mask, processor.preprocess_images(batch.images[q, r]))
        logp = srpo.bin_logprobs(logits, args.temperature).gather(-1, batch.bins[q, r][..., None]).squeeze(-1)
        per_query = (logp * batch.token_mask[q, r]).sum(1)  # (M,) executed tokens only
        return torch.zeros(args.num_envs).index_add_(0, r, per_query)  # (R,)

    before = episode_logprobs()
    torch.testing.assert_close(before, (batch.logprobs * batch.token_mask).sum((0, 2)), atol=1e-3, rtol=0)
    metrics = srpo.update_policy(policy, optimizer, processor, batch, samples, args, autocast, NonFiniteGuard())
    assert metrics["actor/grad_norm"] > 0
    assert_moved_with_advantage(before, episode_logprobs(), samples.advantages)
