"""PPO fine-tuning of OpenVLA in ManiSkill3, in one file.

What it does: rolls out OpenVLA in parallel ManiSkill3 envs, sampling each of the 7 action tokens from the 256
action bins only (the KV cache is filled once per step, then 7 one-token decodes), scores the rollouts with a value
head on the last prompt token's hidden state, computes GAE with truncation bootstrapping, and updates LoRA adapters
(or all weights) and the value head with the clipped PPO objective and a clipped Huber value loss.

Anchors: RLinf's `maniskill_ppo_openvla` example and RL4VLA (PPO, action-level log-probs, grasp-shaped reward,
lr 1e-4 / value head 3e-3, LoRA rank 32, 80-step episodes, temperature 1.0). Departures:
- Every iteration starts fresh episodes from seeds derived from (seed, rank, iteration), so a resumed run replays
  exactly what an uninterrupted one would (with --num-initial-states K, drawn from the fixed seeds 0 .. K-1).
- A truncated episode is bootstrapped with the value of its final observation folded into the reward
  (r + gamma V(s_final)), then treated as done; the anchors do the same through their env wrappers. With
  --reward-mode dense an episode that ends in success is bootstrapped too, as ManiSkill's own PPO baseline does for
  every finished episode: the dense reward pays up to 1 per step, so a success with no future would be worth less
  than hovering next to the goal until the time limit. --no-bootstrap-truncated instead treats the step limit as the
  task's horizon (a truncated episode ends with nothing to come, like GRPO's fixed-length episodes): with the sparse
  reward the bootstrap makes a failed episode worth V(s_final), and V, fed its own estimate, can drift well above
  the success rate, so failures carry little learning signal (docs/results.md, "SFT then PPO").
- The value head sees the hidden state whose output predicts the first action token (RLinf's choice).

Run:
    python ppo_openvla.py --model-path openvla/openvla-7b --unnorm-key bridge_orig --env-id PickCube-v1
    torchrun --nproc-per-node 8 ppo_openvla.py --model-path openvla/openvla-7b --unnorm-key bridge_orig \
        --env-id PutCarrotOnPlateInScene-v1 --num-envs 16 \
        --control-mode arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos
    python ppo_openvla.py --eval-only --checkpoint runs/NAME/checkpoints
    python ppo_openvla.py --eval-only --checkpoint runs/NAME/checkpoints \
        --env-id PutOnPlateInScene25Carrot-v1 --obj-set test   # an out-of-distribution variant (docs/protocols.md)
CPU quickstart (tiny random model, real simulator): see README.md.
Stopping: SIGTERM (Slurm, Kubernetes) or Ctrl-C finishes the current iteration, writes a checkpoint and exits 0;
continue with --resume. Give the job a grace period longer than one iteration plus a save (torchrun
--shutdown-timeout, Slurm --signal=TERM@N, Kubernetes terminationGracePeriodSeconds).
"""

import contextlib
import os
import random
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from peft import LoraConfig
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import DynamicCache

from common import fsdp
from common.checkpoint import check_run_flags, load_safetensors, verify_safetensors_files
from common.dist import all_reduce_mean, bf16_autocast, global_mean_std, init_dist, is_main_process, print0
from common.envs.maniskill import (
    ManiSkillVLAEnv,
    check_env_id,
    check_render_device,
    held_out_seeds,
    obj_set_kwargs,
)
from common.evaluation import advance, gather_episodes, progress, success_metrics
from common.guards import NonFiniteGuard, check_finite_logits, check_flags
from common.logger import Logger, check_tracking, video_file
from common.models.openvla import (
    ActionTokenizer,
    action_stats,
    load_lora_adapter,
    load_openvla,
    make_trainable,
    read_openvla_config,
    resolve_model_path,
    save_lora_adapter,
    save_openvla,
)
from common.run import RunShell, resume_training

ACTION_DIM = 7


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "ppo_openvla"
    """name of the run; logs and checkpoints go to {run_dir}/{exp_name}__s{seed}"""
    run_dir: str = "runs"
    """parent directory of all runs"""
    seed: int = 1
    """seeds python, numpy, torch (offset by rank) and the env reset seeds"""
    # --- model ---
    model_path: str = "openvla/openvla-7b"
    """OpenVLA checkpoint: a local directory in the openvla-7b layout or a hub id"""
    unnorm_key: Optional[str] = None
    """key of the checkpoint's norm_stats used to un-normalise actions (required if it has more than one)"""
    lora_rank: int = 32
    """LoRA rank on every linear layer but the LM head; 0 = full fine-tuning"""
    lora_alpha: int = 16
    """LoRA scaling numerator (the adapter is scaled by alpha / rank)"""
    gradient_checkpointing: bool = False
    """recompute LLM activations in the backward pass (saves memory, costs ~30% time)"""
    bf16: bool = True
    """on GPU: bfloat16 weights for the frozen base under LoRA, and bf16 autocast (ignored on CPU)"""
    fsdp: Literal["auto", "on", "off"] = "auto"
    """FSDP2: shard weights, gradients and AdamW state over ranks (auto: on for full fine-tuning, --lora-rank 0, with
    more than one rank)"""
    # --- environment ---
    env_id: str = "PickCube-v1"
    """ManiSkill3 task id"""
    instruction: Optional[str] = None
    """override the task's language instruction"""
    obj_set: Literal["train", "test", "all"] = "train"
    """object/background split of PutOnPlateInScene25Main-v3 and its out-of-distribution variants (RLinf evaluates
    the variants with test); other tasks accept only train"""
    control_mode: Optional[str] = None
    """ManiSkill controller (default: pd_ee_delta_pose; the Bridge "InScene" tasks have only their own,
    arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos)"""
    num_envs: int = 16
    """parallel envs per rank (each rank owns its envs and rollouts)"""
    max_episode_steps: int = 80
    """episode length limit"""
    num_initial_states: int = 0
    """train on a fixed set of initial states: every iteration resets each env to one of the seeds 0 .. K-1 (an
    episode that ends early is followed by a fresh one). 0: a fresh seed per env from [0, 10**9). Evaluation always
    uses held-out seeds"""
    reward_mode: Literal["auto", "shaped", "sparse", "dense"] = "auto"
    """auto: grasp-shaped where the task reports grasps, else sparse; dense: ManiSkill's normalized dense reward
    (successes are bootstrapped like truncations, see the docstring)"""
    image_size: int = 224
    """camera resolution (square) of the standard tasks; the Bridge "InScene" tasks render their camera's native
    640x480. The processor resizes to the model's 224 either way"""
    sim_backend: Literal["auto", "cpu", "gpu"] = "auto"
    """ManiSkill physics: auto is gpu (physx_cuda, all envs in one process) when CUDA is visible, else cpu (one
    worker process per core, each with a slice of the envs). physx_cuda downloads its PhysX GPU library from GitHub on
    first use; on a node without internet, use cpu (the policy still runs on the GPU)"""
    # --- algorithm: PPO ---
    total_iterations: int = 500
    """number of rollout + update iterations"""
    num_steps: int = 80
    """env steps per env per rollout"""
    learning_rate: float = 1e-4
    """learning rate of the policy (LoRA adapters or all weights)"""
    value_learning_rate: float = 3e-3
    """learning rate of the value head"""
    critic_warmup_iterations: int = 0
    """the first this many iterations update only the value head (the policy stays as it was), as verl's
    `trainer.critic_warmup`: the first policy update then sees advantages from a fitted critic, not a random one"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    bootstrap_truncated: bool = True
    """a truncated episode is bootstrapped with gamma V(final observation) (the anchors); --no-bootstrap-truncated:
    the step limit is the task's horizon and a truncated episode gets no future value"""
    update_epochs: int = 1
    """passes over each rollout"""
    num_minibatches: int = 4
    """optimizer steps per epoch (per-rank rollout split into this many minibatches)"""
    micro_batch_size: int = 8
    """samples per forward/backward; a minibatch accumulates gradients over micro-batches"""
    clip_coef: float = 0.2
    """PPO ratio clip"""
    value_clip: float = 0.2
    """value prediction clip around the rollout values"""
    huber_delta: float = 10.0
    """Huber loss delta of the value loss"""
    vf_coef: float = 1.0
    """value loss coefficient"""
    ent_coef: float = 0.0
    """entropy bonus coefficient (entropy is logged regardless)"""
    norm_adv: bool = True
    """normalise advantages over the whole batch (all ranks)"""
    max_grad_norm: float = 10.0
    """gradient clipping norm"""
    temperature: float = 1.0
    """sampling temperature of training rollouts (the training log-prob uses the same one)"""
    # --- eval, logging, checkpoints ---
    eval_interval: int = 10
    """evaluate every this many iterations and after the last one (0: only after the last one)"""
    eval_temperature: float = 0.6
    """sampling temperature at eval (RLinf's 0.6; 0 = greedy)"""
    capture_video: bool = False
    """save an mp4 of env 0 of each evaluation"""
    track: bool = False
    """mirror the TensorBoard scalars, the hyperparameters and the eval videos to Weights & Biases (pip install wandb;
    WANDB_MODE=offline on a node without network)"""
    wandb_project_name: str = "vla-rl"
    """W&B project of --track"""
    wandb_entity: Optional[str] = None
    """W&B team or user of --track (default: your own)"""
    save_interval: int = 10
    """checkpoint every this many iterations and after the last one (0: only after the last one)"""
    keep_checkpoints: int = 3
    """keep only the newest this many checkpoints (0: all)"""
    resume: Optional[str] = None
    """checkpoint step directory, or a checkpoints directory with a `latest` file, to continue from; `auto`: this run
    directory's own checkpoints if it has any, else a new run (the setting for torchrun --max-restarts, Slurm
    --requeue and Kubernetes restarts, which relaunch the same command)"""
    eval_only: bool = False
    """only evaluate --checkpoint (or the base model if none) and exit"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""
    overwrite: bool = False
    """start over in a run directory that holds checkpoints, deleting them (or, with --resume from an older step,
    delete the later steps)"""
    dist_timeout_s: float = 300.0
    """seconds a collective waits for the other ranks before this rank stops with an error naming where it waited (a
    dead or hung rank then ends the job in this time, not PyTorch's 10-30 minutes)"""

    # derived from the flags above in validate()
    batch_size: tyro.conf.Suppress[int] = 0
    """samples per rank per iteration (num_envs x num_steps)"""
    minibatch_size: tyro.conf.Suppress[int] = 0
    """samples per rank per optimizer step"""


def validate(args: Args, world_size: int) -> tuple[dict, str]:
    """Every check that can fail on user input, before envs or weights are loaded. Returns the model config and the
    run directory."""
    check_tracking(args)  # --track without wandb installed
    check_flags(
        args,
        positive=(
            "num_envs",
            "num_steps",
            "num_minibatches",
            "micro_batch_size",
            "update_epochs",
            "total_iterations",
            "max_episode_steps",
        ),
        non_negative=(
            "eval_interval",
            "save_interval",
            "keep_checkpoints",
            "eval_temperature",
            "num_initial_states",
            "critic_warmup_iterations",
        ),
    )
    if not args.temperature > 0:
        raise ValueError(
            f"--temperature must be > 0 for training rollouts, got {args.temperature} "
            "(--eval-temperature 0 is greedy evaluation)"
        )
    if args.image_size < 32:
        raise ValueError(f"--image-size must be at least 32 (pixels per side), got {args.image_size}")
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {args.lora_rank}")
    fsdp.use_fsdp(args.fsdp, args.lora_rank, world_size)  # --fsdp on with LoRA -> error now
    args.batch_size = args.num_envs * args.num_steps
    if args.batch_size % args.num_minibatches:
        raise ValueError(
            f"--num-envs x --num-steps ({args.batch_size}) is not divisible by "
            f"--num-minibatches ({args.num_minibatches})"
        )
    args.minibatch_size = args.batch_size // args.num_minibatches
    if args.minibatch_size % args.micro_batch_size:
        raise ValueError(
            f"minibatch size {args.minibatch_size} (= num_envs x num_steps / num_minibatches) is not "
            f"divisible by --micro-batch-size ({args.micro_batch_size})"
        )
    run_path = check_run_flags(
        args, "ppo_openvla.py", inherited=("model_path", "unnorm_key", "lora_rank", "lora_alpha")
    )
    check_env_id(args.env_id)
    obj_set_kwargs(args.env_id, args.obj_set)  # --obj-set on a task without a split -> error now
    check_render_device()
    args.model_path = resolve_model_path(args.model_path)
    config = read_openvla_config(args.model_path)
    verify_safetensors_files(args.model_path)
    action_stats(config, args.unnorm_key)
    return config, run_path


# ---------------------------------------------------------------------------------------------------------------
# Policy: OpenVLA (actor) + value head (critic)
# ---------------------------------------------------------------------------------------------------------------
class ActorCritic(nn.Module):
    def __init__(self, vla, action_tokenizer: ActionTokenizer):
        super().__init__()
        self.vla = vla
        self.first_action_token = action_tokenizer.first_token
        self.n_bins = action_tokenizer.n_bins
        hidden = vla.hidden_size
        self.value_head = nn.Sequential(
            nn.Linear(hidden, 512), nn.GELU(), nn.Linear(512, 128), nn.GELU(), nn.Linear(128, 1)
        )

    def action_logits(self, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
        """(..., D) -> (..., 256) float logits of the action tokens only, divided by the temperature: masking every
        other token to -inf and renormalising is the same distribution. Rollout and training both go through here."""
        first = self.first_action_token
        weight = self.vla.language_model.lm_head.weight[first : first + self.n_bins]
        return F.linear(hidden, weight).float() / max(temperature, 1e-6)

    def value(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden.to(self.value_head[0].weight.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def act(self, pixel_values, input_ids, attention_mask, temperature: float):
        """Sample 7 action tokens with the KV cache. Returns tokens (B, 7), log-prob (B,) summed over the 7,
        value (B,). temperature 0 = greedy."""
        lm = self.vla.language_model
        embeds, mask, position_ids = self.vla.embed_multimodal(input_ids, attention_mask, pixel_values)
        cache = DynamicCache()
        hidden = lm.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True
        ).last_hidden_state[:, -1]
        value = self.value(hidden)
        tokens, logprob = [], torch.zeros(len(hidden), device=hidden.device)
        for i in range(ACTION_DIM):
            logits = self.action_logits(hidden, temperature)  # (B, 256)
            check_finite_logits(logits)
            if temperature > 0:
                index = torch.multinomial(logits.softmax(-1), 1).squeeze(-1)
            else:
                index = logits.argmax(-1)
            logprob += logits.log_softmax(-1).gather(-1, index[:, None]).squeeze(-1)
            token = index + self.first_action_token
            tokens.append(token)
            if i < ACTION_DIM - 1:
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
                position_ids = position_ids[:, -1:] + 1
                hidden = lm.model(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                ).last_hidden_state[:, -1]
        return torch.stack(tokens, 1), logprob, value

    @torch.no_grad()
    def predict_value(self, pixel_values, input_ids, attention_mask):
        embeds, mask, position_ids = self.vla.embed_multimodal(input_ids, attention_mask, pixel_values)
        hidden = self.vla.language_model.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids
        ).last_hidden_state[:, -1]
        return self.value(hidden)

    def forward(self, pixel_values, input_ids, attention_mask, action_tokens, temperature: float):
        """Training pass, teacher-forced on the sampled tokens. Returns log-prob (B,), per-token entropy (B,),
        value (B,)."""
        ids = torch.cat([input_ids, action_tokens[:, :-1]], 1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(len(ids), ACTION_DIM - 1)], 1)
        embeds, mask, position_ids = self.vla.embed_multimodal(ids, mask, pixel_values)
        hidden = self.vla.language_model.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids
        ).last_hidden_state
        hidden = hidden[:, -ACTION_DIM:]  # (B, 7, D): the positions that predict the 7 action tokens
        logp = self.action_logits(hidden, temperature).log_softmax(-1)  # (B, 7, 256)
        logprob = logp.gather(-1, (action_tokens - self.first_action_token)[..., None]).squeeze(-1).sum(-1)
        entropy = -(logp.exp() * logp).sum(-1).mean(-1)
        return logprob, entropy, self.value(hidden[:, 0])


def to_env_action(tokens: torch.Tensor, action_tokenizer: ActionTokenizer, stats: dict) -> torch.Tensor:
    """OpenVLA's 7 action tokens (N, 7) -> the ManiSkill action (N, 7): the xyz and rotation deltas un-normalised
    with the checkpoint's statistics and sent as they are; the gripper (mask False: not un-normalised, so in [0, 1])
    becomes +1 (open) above 0.5, else -1 (close), as RLinf's `prepare_actions_for_maniskill` and RL4VLA do. Sent
    as it is, a "close" of 0 would command the middle of the finger range: a half-open gripper."""
    action = ActionTokenizer.unnormalize(action_tokenizer.tokens_to_normalized(tokens).float(), stats).cpu()
    return torch.cat([action[:, :6], 2.0 * (action[:, 6:] > 0.5).float() - 1.0], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: reward shaping, advantages and losses
# ---------------------------------------------------------------------------------------------------------------
class GraspShapedReward:
    """RLinf / RL4VLA pick-and-place shaping: potential s_t = 0.1 grasped + 0.1 consecutive_grasp
    + 1.0 (success and grasped), reward r_t = s_t - s_{t-1}. Tasks that do not report `consecutive_grasp` count it as
    "grasped for 5 steps in a row" (1 s at the Bridge tasks' 5 Hz control)."""

    def __init__(self, num_envs: int, consecutive_steps: int = 5):
        self.consecutive_steps = consecutive_steps
        self.prev_potential = torch.zeros(num_envs)
        self.grasp_steps = torch.zeros(num_envs, dtype=torch.long)

    def reset(self, done: torch.Tensor) -> None:
        """Start the potential of the envs in `done` (N,) bool from zero (a new episode)."""
        self.prev_potential[done] = 0.0
        self.grasp_steps[done] = 0

    def __call__(self, info: dict[str, torch.Tensor]) -> torch.Tensor:
        grasped = info["grasped"]  # (N,) bool
        self.grasp_steps = torch.where(grasped, self.grasp_steps + 1, torch.zeros_like(self.grasp_steps))
        consecutive = info.get("consecutive_grasp", self.grasp_steps >= self.consecutive_steps)
        potential = 0.1 * grasped.float() + 0.1 * consecutive.float() + 1.0 * (info["success"] & grasped).float()
        reward = potential - self.prev_potential
        self.prev_potential = potential
        return reward


def bootstrap_mask(terminated, truncated, reward_mode: str, bootstrap_truncated: bool) -> torch.Tensor:
    """(N,) bool: the finished episodes whose last reward gets gamma V(final observation) folded in. Truncated ones
    (the anchors; none with --no-bootstrap-truncated) and, with the dense reward, successful ones too (ManiSkill's
    PPO). A step that both succeeds and hits the time limit counts as a success."""
    mask = truncated & ~terminated if bootstrap_truncated else torch.zeros_like(truncated)
    return mask | terminated if reward_mode == "dense" else mask


def compute_gae(rewards, values, dones, next_value, gamma: float, lam: float):
    """rewards, values, dones: (T, N); dones[t] = the step t ended the episode; next_value (N,) = V(s_T).
    delta_t = r_t + gamma V_{t+1} (1 - d_t) - V_t;  A_t = delta_t + gamma lam (1 - d_t) A_{t+1};  returns = A + V."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(len(rewards))):
        nonterminal = 1.0 - dones[t]
        next_v = next_value if t == len(rewards) - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_v * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        advantages[t] = last
    return advantages, advantages + values


def ppo_losses(new_logprob, old_logprob, advantages, new_value, old_value, returns, clip_coef, value_clip, huber_delta):
    """Clipped policy loss on the action-level ratio, clipped Huber value loss; all inputs (B,)."""
    logratio = new_logprob - old_logprob
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    value_clipped = old_value + (new_value - old_value).clamp(-value_clip, value_clip)
    v_loss1 = F.huber_loss(new_value, returns, delta=huber_delta, reduction="none")
    v_loss2 = F.huber_loss(value_clipped, returns, delta=huber_delta, reduction="none")
    v_loss = torch.max(v_loss1, v_loss2).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()  # k3 estimator
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return pg_loss, v_loss, approx_kl, clipfrac


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: LoRA adapter (or full weights in the openvla layout) + value head + trainer state
# ---------------------------------------------------------------------------------------------------------------
def save_policy(
    policy: ActorCritic, processor, lora_config: Optional[LoraConfig], directory: str, full_state: Optional[dict] = None
) -> None:
    """full_state: the gathered state dict of an FSDP-sharded policy (its parameters are shards)."""
    if lora_config is not None:
        save_lora_adapter(policy.vla, lora_config, directory)
    else:
        vla_state = fsdp.sub_state_dict(full_state, "vla.") if full_state else None
        save_openvla(policy.vla, processor, os.path.join(directory, "model"), state_dict=vla_state)
    head_state = fsdp.sub_state_dict(full_state, "value_head.") if full_state else policy.value_head.state_dict()
    save_file(head_state, os.path.join(directory, "value_head.safetensors"))


def load_policy_weights(policy: ActorCritic, directory: str, lora: bool) -> None:
    if lora:
        load_lora_adapter(policy.vla, directory)
    policy.value_head.load_state_dict(load_safetensors(os.path.join(directory, "value_head.safetensors")))


# ---------------------------------------------------------------------------------------------------------------
# Rollout: num_steps steps of every env, with auto-reset; (T, N, ...) tensors on the CPU
# ---------------------------------------------------------------------------------------------------------------
class Rollout(NamedTuple):
    """One iteration's rollout of this rank's N envs over T steps."""

    images: torch.Tensor  # (T, N, H, W, 3) uint8, what the policy saw (preprocessed again at update time)
    instructions: list[list[str]]  # (T, N): objects and hence instructions can change at every reset
    action_tokens: torch.Tensor  # (T, N, 7) the sampled action tokens
    logprobs: torch.Tensor  # (T, N) log-prob of the 7 tokens under the rollout policy
    values: torch.Tensor  # (T, N) V(observation)
    env_rewards: torch.Tensor  # (T, N) the env's reward (ManiSkill's normalised dense reward with --reward-mode dense)
    success: torch.Tensor  # (T, N) bool
    grasped: torch.Tensor  # (T, N) bool, with the shaped reward (else False)
    consecutive_grasp: Optional[torch.Tensor]  # (T, N) bool, where the task reports it
    terminated: torch.Tensor  # (T, N) bool
    truncated: torch.Tensor  # (T, N) bool
    final_values: torch.Tensor  # (T, N) V(final observation) of the episodes to bootstrap (bootstrap_mask), else 0
    next_value: torch.Tensor  # (N,) V of the observation after the last step
    reward_mode: str  # --reward-mode with auto resolved: shaped where the task reports grasps, else sparse
    policy_s: float  # time spent in the policy's forwards


@torch.no_grad()
def rollout(policy, processor, env_action, envs, seeds, args, autocast) -> Rollout:
    """T = --num-steps steps of every env from the given reset seeds; an episode that ends is followed by a fresh one
    (the env auto-resets). Actions are sampled at --temperature; the value of each observation is stored, and so is
    V(final observation) of the episodes whose last reward gets it folded in (stage 2), while that observation is at
    hand."""
    device = next(policy.parameters()).device
    T, N = args.num_steps, envs.num_envs
    H, W = envs.image_shape
    images = torch.zeros((T, N, H, W, 3), dtype=torch.uint8)
    instructions = [[""] * N for _ in range(T)]
    action_tokens = torch.zeros((T, N, ACTION_DIM), dtype=torch.long)
    logprobs, values, env_rewards, final_values = (torch.zeros((T, N)) for _ in range(4))
    success, grasped, terminated, truncated = (torch.zeros((T, N), dtype=torch.bool) for _ in range(4))
    consecutive_grasp = None  # (T, N), where the task reports it
    reward_mode, policy_s = args.reward_mode, 0.0
    obs = envs.reset(seeds)
    prompt_ids, prompt_mask = processor.prompt_ids(envs.instructions, device=device)  # (N, L) left-padded
    bar = progress(T, "rollout", "step", is_main_process())
    for t in range(T):
        images[t], instructions[t] = obs["rgb"], list(envs.instructions)
        t0 = time.time()
        with autocast:
            pixel_values = processor.preprocess_images(obs["rgb"].to(device))
            tokens, logprob, value = policy.act(pixel_values, prompt_ids, prompt_mask, args.temperature)
        policy_s += time.time() - t0
        action_tokens[t], logprobs[t], values[t] = tokens.cpu(), logprob.cpu(), value.cpu()
        obs, env_rewards[t], terminated[t], truncated[t], info = envs.step(env_action(tokens))
        success[t] = info["success"]
        if t == 0 and reward_mode == "auto":
            reward_mode = "shaped" if "grasped" in info else "sparse"
        if reward_mode == "shaped":
            if "grasped" not in info:
                raise ValueError(f"--reward-mode shaped: {args.env_id} reports no grasp signal; use sparse/dense")
            grasped[t] = info["grasped"]
            if "consecutive_grasp" in info:
                if consecutive_grasp is None:
                    consecutive_grasp = torch.zeros((T, N), dtype=torch.bool)
                consecutive_grasp[t] = info["consecutive_grasp"]
        bootstrap = bootstrap_mask(terminated[t], truncated[t], reward_mode, args.bootstrap_truncated)
        if bootstrap.any():  # the critic's estimate of the final observation, before the auto-reset replaced it
            rows = bootstrap.to(device)
            with autocast:
                final_pixels = processor.preprocess_images(info["final_obs"]["rgb"][bootstrap].to(device))
                final_value = policy.predict_value(final_pixels, prompt_ids[rows], prompt_mask[rows])
            final_values[t, bootstrap] = final_value.cpu()
        if info["reset_mask"].any():  # new episodes: their instructions may differ
            prompt_ids, prompt_mask = processor.prompt_ids(envs.instructions, device=device)
        advance(bar, 1, f"{int(success[: t + 1].any(0).sum())} of {N} envs succeeded (this rank)")
    bar.close()
    with autocast:
        pixel_values = processor.preprocess_images(obs["rgb"].to(device))
        next_value = policy.predict_value(pixel_values, prompt_ids, prompt_mask).cpu()
    return Rollout(
        images,
        instructions,
        action_tokens,
        logprobs,
        values,
        env_rewards,
        success,
        grasped,
        consecutive_grasp,
        terminated,
        truncated,
        final_values,
        next_value,
        reward_mode,
        policy_s,
    )


def step_rewards(batch: Rollout) -> torch.Tensor:
    """The reward of every step (T, N) under the rollout's reward mode: grasp-shaped (a fresh potential for every
    episode), sparse success, or the env's dense reward."""
    if batch.reward_mode == "sparse":
        return batch.success.float()
    if batch.reward_mode == "dense":
        return batch.env_rewards
    T, N = batch.success.shape
    shaped, rewards = GraspShapedReward(N), torch.zeros((T, N))
    for t in range(T):
        info = {"grasped": batch.grasped[t], "success": batch.success[t]}
        if batch.consecutive_grasp is not None:
            info["consecutive_grasp"] = batch.consecutive_grasp[t]
        rewards[t] = shaped(info)
        shaped.reset(batch.terminated[t] | batch.truncated[t])
    return rewards


def finished_episodes(rewards: torch.Tensor, dones: torch.Tensor, success: torch.Tensor) -> dict[str, list[float]]:
    """Return, length and success of every episode that ended within the rollout; rewards, dones, success (T, N)."""
    episode_return, episode_length = torch.zeros(rewards.size(1)), torch.zeros(rewards.size(1))
    out = {"returns": [], "lengths": [], "success": []}
    for t in range(len(rewards)):
        episode_return += rewards[t]
        episode_length += 1
        for i in torch.nonzero(dones[t]).flatten().tolist():
            out["returns"].append(episode_return[i].item())
            out["lengths"].append(episode_length[i].item())
            out["success"].append(float(success[t, i]))
        episode_return[dones[t]], episode_length[dones[t]] = 0.0, 0.0
    return out


# ---------------------------------------------------------------------------------------------------------------
# Update: epochs x minibatches over the rollout's T x N samples, gradient accumulation over micro-batches
# ---------------------------------------------------------------------------------------------------------------
def update_policy(
    policy, ddp_policy, optimizer, processor, samples: dict, args, autocast, guard, warmup: bool, world_size: int
) -> dict:
    """PPO epochs over the flattened samples (images, instructions, tokens, logprobs, values, advantages, returns;
    each (T * N, ...)); returns actor/* and critic/* metrics. warmup: the critic warm-up, the value head alone
    learns. ddp_policy is the policy itself, or its DDP wrapper (which averages gradients over ranks)."""
    device = next(policy.parameters()).device
    trainable = [p for p in policy.parameters() if p.requires_grad]
    use_ddp = ddp_policy is not policy
    policy.train()
    sums: dict[str, float] = {}
    num_updates = 0
    for _ in range(args.update_epochs):
        order = torch.randperm(args.batch_size)
        for start in range(0, args.batch_size, args.minibatch_size):
            minibatch = order[start : start + args.minibatch_size]
            optimizer.zero_grad(set_to_none=True)
            minibatch_loss = 0.0
            micro_batches = minibatch.split(args.micro_batch_size)
            for k, mb in enumerate(micro_batches):
                last = world_size == 1 or k == len(micro_batches) - 1
                sync = ddp_policy.no_sync() if use_ddp and not last else contextlib.nullcontext()
                mb_ids, mb_mask = processor.prompt_ids([samples["instructions"][i] for i in mb.tolist()], device=device)
                with sync, autocast:
                    pixel_values = processor.preprocess_images(samples["images"][mb].to(device))
                    new_logprob, entropy, new_value = ddp_policy(
                        pixel_values, mb_ids, mb_mask, samples["tokens"][mb].to(device), args.temperature
                    )
                    pg_loss, v_loss, approx_kl, clipfrac = ppo_losses(
                        new_logprob,
                        samples["logprobs"][mb].to(device),
                        samples["advantages"][mb].to(device),
                        new_value,
                        samples["values"][mb].to(device),
                        samples["returns"][mb].to(device),
                        args.clip_coef,
                        args.value_clip,
                        args.huber_delta,
                    )
                    if warmup:
                        loss = args.vf_coef * v_loss
                    else:
                        loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy.mean()
                    (loss * len(mb) / len(minibatch)).backward()
                minibatch_loss += loss.detach() * len(mb) / len(minibatch)
                for key, value in (
                    ("actor/pg_loss", pg_loss),
                    ("critic/value_loss", v_loss),
                    ("actor/entropy", entropy.mean()),
                    ("actor/approx_kl", approx_kl),
                    ("actor/clipfrac", clipfrac),
                ):
                    sums[key] = sums.get(key, 0.0) + value.item() * len(mb) / len(minibatch)
            if warmup:  # the value loss's gradient reaches the shared trunk too: drop it, so the policy stays put
                for p in policy.vla.parameters():
                    p.grad = None
            grad_norm = fsdp.clip_grad_norm_(trainable, args.max_grad_norm)  # the norm before clipping
            if guard.finite(minibatch_loss, grad_norm):  # skipped on every rank alike when not
                optimizer.step()
                sums["actor/grad_norm"] = sums.get("actor/grad_norm", 0.0) + grad_norm.item()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
    return {k: v / num_updates for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation (RLinf's protocol): held-out seeds, --eval-temperature sampling, every episode runs its full length
# ignoring termination; success at any step (success_rate) and at the last step (success_at_end)
# ---------------------------------------------------------------------------------------------------------------
# the flags that fix what one evaluation episode is: recorded in eval/step_*.summary.json and matched against the
# anchors' protocols (common/evaluation.py)
EVAL_PROTOCOL_FLAGS = ("env_id", "obj_set", "instruction", "control_mode", "max_episode_steps", "eval_temperature")


@torch.no_grad()
def evaluate(policy, processor, env_action, envs, args, dist, autocast, step: int):
    """One episode per env from the held-out seeds; returns the metrics, env 0's frames, every rank's episodes."""
    seeds = held_out_seeds(dist.rank, envs.num_envs)
    policy.eval()
    envs.ignore_terminations = True
    obs = envs.reset(seeds)
    prompt_ids, prompt_mask = processor.prompt_ids(envs.instructions, device=dist.device)
    frames = [obs["rgb"][0]]
    returns = torch.zeros(envs.num_envs)
    bar = progress(envs.max_episode_steps, f"eval {args.env_id}", "step", dist.is_main)
    for _ in range(envs.max_episode_steps):
        with autocast:
            pixel_values = processor.preprocess_images(obs["rgb"].to(dist.device))
            tokens, _, _ = policy.act(pixel_values, prompt_ids, prompt_mask, args.eval_temperature)
        obs, reward, _, truncated, info = envs.step(env_action(tokens))
        returns += reward
        frames.append(info["final_obs"]["rgb"][0])
        advance(bar, 1, f"succeeded so far {int(info['success_once'].sum())} of {envs.num_envs} (this rank)")
    bar.close()
    envs.ignore_terminations = False
    assert truncated.all(), "every eval episode ends at the time limit"
    mine = [
        {
            "task": args.env_id,
            "seed": seed,
            "success": bool(info["success_once"][i]),  # at any step
            "success_at_end": bool(info["success"][i]),
            "length": envs.max_episode_steps,
            "return": float(returns[i]),
            "temperature": args.eval_temperature,
        }
        for i, seed in enumerate(seeds)
    ]
    if args.capture_video and dist.is_main:
        mine[0]["video"] = video_file("eval/video", step)
    episodes = gather_episodes(mine)
    return success_metrics(episodes), frames if args.capture_video else [], episodes


def main(args: Args) -> None:
    # ---------------------------------------------------------------------------------------------------------------
    # Setup: validation, distributed, seeds, envs, model, optimizer
    # ---------------------------------------------------------------------------------------------------------------
    dist = init_dist(args.dist_timeout_s)
    config, run_path = validate(args, dist.world_size)
    device = dist.device
    print0(
        f"run {run_path}: {dist.world_size} rank(s) x {args.num_envs} envs, "
        f"{args.batch_size * dist.world_size} samples per iteration"
    )

    random.seed(args.seed + dist.rank)
    np.random.seed(args.seed + dist.rank)
    torch.manual_seed(args.seed)  # identical LoRA and value-head init on every rank (DDP also broadcasts rank 0's)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if (on_gpu and args.bf16 and args.lora_rank > 0) else torch.float32
    autocast = bf16_autocast(device, args.bf16)

    envs = ManiSkillVLAEnv(
        args.env_id,
        args.num_envs,
        sim_backend=args.sim_backend,
        image_size=args.image_size,
        dense_reward=args.reward_mode == "dense",
        instruction=args.instruction,
        max_episode_steps=args.max_episode_steps,
        control_mode=args.control_mode,
        env_kwargs=obj_set_kwargs(args.env_id, args.obj_set),
    )

    checkpoint_dir = args.resume or args.checkpoint
    model_dir = os.path.join(checkpoint_dir, "model") if checkpoint_dir and args.lora_rank == 0 else args.model_path
    sharded = fsdp.use_fsdp(args.fsdp, args.lora_rank, dist.world_size)  # FSDP2 moves each shard to the GPU itself
    vla, processor = load_openvla(model_dir, device="cpu" if sharded else device, dtype=dtype)
    if args.gradient_checkpointing:
        vla.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_config = make_trainable(vla, args.lora_rank, args.lora_alpha)  # None = full fine-tuning
    action_tokenizer = ActionTokenizer(vla.vocab_size, vla.n_action_bins)
    stats = action_stats(config, args.unnorm_key)
    policy = ActorCritic(vla, action_tokenizer)
    if checkpoint_dir:
        load_policy_weights(policy, checkpoint_dir, lora=lora_config is not None)
    if sharded:  # per decoder layer and ViT block, then the root; starts every rank from rank 0's weights
        fsdp.shard_model(policy, reduce="mean", forward_methods=("act", "predict_value"))
    else:
        policy.to(device)

    def env_action(tokens: torch.Tensor) -> torch.Tensor:
        return to_env_action(tokens, action_tokenizer, stats)

    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in policy.vla.parameters() if p.requires_grad], "lr": args.learning_rate},
            {"params": list(policy.value_head.parameters()), "lr": args.value_learning_rate},
        ],
        eps=1e-5,
        weight_decay=0.0,
    )
    print0(
        f"trainable parameters: {sum(p.numel() for p in trainable):,} of "
        f"{sum(p.numel() for p in policy.parameters()):,}"
    )
    start_iteration = resume_training(args, policy, optimizer, sharded)
    use_ddp = dist.world_size > 1 and not sharded
    ddp_policy = DDP(policy) if use_ddp else policy  # DDP broadcasts rank 0's weights at construction
    logger = Logger(run_path, args, enabled=dist.is_main)

    def run_evaluation(step: int) -> tuple[dict, list, list]:
        with fsdp.gathered_params(policy):
            return evaluate(policy, processor, env_action, envs, args, dist, autocast, step)

    def write(directory: str, full_state: Optional[dict]) -> None:
        """LoRA adapter (or the full model) + value head."""
        save_policy(policy, processor, lora_config, directory, full_state)

    shell = RunShell(args, run_path, policy, optimizer, sharded, write, logger, envs, EVAL_PROTOCOL_FLAGS)
    if args.eval_only:
        return shell.eval_only(run_evaluation, start_iteration)

    guard = NonFiniteGuard()  # skips an optimizer step with a non-finite loss or gradient norm
    T, N = args.num_steps, args.num_envs
    summary = (  # the line printed after every iteration
        "success {rollout/success_rate:.3f} reward {rollout/reward_mean:.4f} pg {actor/pg_loss:.4f} "
        "v {critic/value_loss:.4f} kl {actor/approx_kl:.5f} env steps/s {time/env_steps_per_s:.1f}"
    )
    for iteration in range(start_iteration + 1, args.total_iterations + 1):
        # -----------------------------------------------------------------------------------------------------------
        # 1. Rollout: fresh episodes from seeds derived from (seed, rank, iteration), so a resume draws the same ones
        #    (the CPU sim itself may still differ: see docs/results.md)
        # -----------------------------------------------------------------------------------------------------------
        rollout_start = time.time()
        rng = np.random.default_rng([args.seed, dist.rank, iteration])
        torch.manual_seed(int(rng.integers(2**62)))  # action sampling and minibatch order
        seeds = rng.integers(0, args.num_initial_states or 10**9, N).tolist()
        policy.eval()
        with fsdp.gathered_params(policy):  # FSDP: full weights for the rollout's many small forwards
            batch = rollout(policy, processor, env_action, envs, seeds, args, autocast)
        rollout_s = time.time() - rollout_start

        # -----------------------------------------------------------------------------------------------------------
        # 2. Reward: the task's, or grasp-shaped; a truncated episode (unless --no-bootstrap-truncated) and, with the
        #    dense reward, a successful one get gamma V(final observation) folded into their last reward
        # -----------------------------------------------------------------------------------------------------------
        task_rewards = step_rewards(batch)  # (T, N) what the task pays, logged as rollout/reward_mean
        rewards = task_rewards + args.gamma * batch.final_values  # final_values is 0 where nothing is bootstrapped
        dones = (batch.terminated | batch.truncated).float()

        # -----------------------------------------------------------------------------------------------------------
        # 3. Advantage: GAE, normalised over the samples of every rank
        # -----------------------------------------------------------------------------------------------------------
        advantages, returns = compute_gae(rewards, batch.values, dones, batch.next_value, args.gamma, args.gae_lambda)
        samples = {
            "images": batch.images.reshape(T * N, *batch.images.shape[2:]),  # (T * N, H, W, 3)
            "instructions": [text for step in batch.instructions for text in step],  # (T * N,)
            "tokens": batch.action_tokens.reshape(T * N, ACTION_DIM),  # (T * N, 7)
            "logprobs": batch.logprobs.reshape(-1),
            "values": batch.values.reshape(-1),
            "advantages": advantages.reshape(-1),
            "returns": returns.reshape(-1),
        }
        if args.norm_adv:
            mean, std = global_mean_std(samples["advantages"])
            samples["advantages"] = (samples["advantages"] - mean) / (std + 1e-8)

        # -----------------------------------------------------------------------------------------------------------
        # 4. Update: epochs x minibatches; in the critic warm-up the value head alone learns
        # -----------------------------------------------------------------------------------------------------------
        update_start = time.time()
        warmup = iteration <= args.critic_warmup_iterations
        update_metrics = update_policy(
            policy, ddp_policy, optimizer, processor, samples, args, autocast, guard, warmup, dist.world_size
        )
        update_s = time.time() - update_start

        # -----------------------------------------------------------------------------------------------------------
        # 5. Log, evaluate, checkpoint
        # -----------------------------------------------------------------------------------------------------------
        episodes = finished_episodes(task_rewards, dones.bool(), batch.success)
        explained_var = 1 - (samples["returns"] - samples["values"]).var() / samples["returns"].var().clamp(min=1e-8)
        metrics = update_metrics | {
            "actor/lr": args.learning_rate,
            "actor/skipped_steps": float(guard.skipped_steps),
            "critic/explained_variance": explained_var.item(),
            "critic/value_mean": samples["values"].mean().item(),
            "rollout/reward_mean": task_rewards.mean().item(),
            "rollout/return_mean": float(np.mean(episodes["returns"])) if episodes["returns"] else 0.0,
            "rollout/success_rate": float(np.mean(episodes["success"])) if episodes["success"] else 0.0,
            "rollout/episode_length": float(np.mean(episodes["lengths"])) if episodes["lengths"] else float(T),
            "rollout/episodes": float(len(episodes["success"])),
            "rollout/advantage_mean": advantages.mean().item(),
            "env/worker_restarts": float(envs.worker_restarts),
            "time/rollout_s": rollout_s,
            "time/update_s": update_s,
            # throughput of all ranks together (x world size, then averaged over ranks)
            "time/env_steps_per_s": T * N / rollout_s * dist.world_size,
            "time/actions_per_s": T * N / batch.policy_s * dist.world_size,
            "time/update_samples_per_s": args.update_epochs * args.batch_size / update_s * dist.world_size,
        }
        if shell.end_of_iteration(iteration, all_reduce_mean(metrics), run_evaluation, summary):
            break
    shell.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
