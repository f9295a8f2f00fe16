"""What every evaluation leaves behind: one record per episode, a summary with 95% Wilson intervals, the anchor
protocol it matches, and a progress bar while it runs.

    episodes = gather_episodes(mine)            # every rank's records (a list of dicts), each episode once
    metrics = success_metrics(episodes)         # the eval/* scalars of TensorBoard, computed from the records
    write_evaluation(run_path, step, episodes, summarize(episodes, ...))   # rank 0: eval/step_XXXXXXXX.jsonl + summary

A record has `task` (the env id, or `{suite}/task_XX` in LIBERO), the episode's id within the task (`seed`: its
reset seed, or `init_state`), `success`, `length`, `temperature`, and where the script has them `success_at_end`,
`return` and `video` (a path relative to the run directory). `python -m common.eval_report` reads them back.
"""

import json
import math
import os
import sys
from typing import Any, Optional

import torch.distributed as dist
from tqdm import tqdm

from common.checkpoint import git_commit, script_name, write_text_atomic

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default): unlike the normal one it stays in [0, 1]
    and is not empty at 0 or n successes."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def episode_key(record: dict) -> tuple:
    """What makes an episode unique in an evaluation: its task and its reset seed or init state."""
    return record["task"], record.get("seed", record.get("init_state"))


def gather_episodes(mine: list[dict]) -> list[dict]:
    """Every rank's episode records on every rank, in rank order (a no-op in a 1-process world). Refuses an
    evaluation in which an episode was run twice."""
    if dist.is_available() and dist.is_initialized():
        parts: list[Optional[list[dict]]] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        episodes = [record for part in parts for record in part]
    else:
        episodes = list(mine)
    keys = [episode_key(r) for r in episodes]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)[:5]
        raise RuntimeError(f"evaluation ran these episodes more than once (task, seed or init state): {twice}")
    return episodes


def rate(episodes: list[dict], field: str = "success") -> float:
    return sum(bool(r[field]) for r in episodes) / len(episodes)


def success_metrics(episodes: list[dict]) -> dict[str, float]:
    """eval/success_rate (and eval/success_at_end where the records have it), eval/episode_length."""
    metrics = {"eval/success_rate": rate(episodes)}
    if "success_at_end" in episodes[0]:
        metrics["eval/success_at_end"] = rate(episodes, "success_at_end")
    metrics["eval/episode_length"] = sum(r["length"] for r in episodes) / len(episodes)
    return metrics


def proportion(episodes: list[dict], field: str = "success") -> dict[str, Any]:
    """episodes, successes, rate and 95% Wilson interval of a boolean field over these episodes."""
    k, n = sum(bool(r[field]) for r in episodes), len(episodes)
    return {"episodes": n, "successes": k, "success_rate": k / n, "ci95": list(wilson_interval(k, n))}


# ---------------------------------------------------------------------------------------------------------------
# The anchors' protocols: the flags that fix what one episode is (task, object set, temperature, length, init states)
# ---------------------------------------------------------------------------------------------------------------
MANISKILL_OOD = [
    "PutOnPlateInScene25VisionImage-v1",
    "PutOnPlateInScene25VisionTexture03-v1",
    "PutOnPlateInScene25VisionTexture05-v1",
    "PutOnPlateInScene25VisionWhole03-v1",
    "PutOnPlateInScene25VisionWhole05-v1",
    "PutOnPlateInScene25Carrot-v1",
    "PutOnPlateInScene25Plate-v1",
    "PutOnPlateInScene25Instruct-v1",
    "PutOnPlateInScene25MultiCarrot-v1",
    "PutOnPlateInScene25MultiPlate-v1",
    "PutOnPlateInScene25Position-v1",
    "PutOnPlateInScene25EEPose-v1",
    "PutOnPlateInScene25PositionChangeTo-v1",
]
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")  # 10 tasks each
ALL_TEN_TASKS = list(range(10))  # what --task-ids (default: all) becomes for these suites
# RLinf's ManiSkill evaluation (RL4VLA's protocol): the task, its object set, sampling at T 0.6, 80 steps, every
# episode run to the limit, success at any step; RL4VLA's eval.sh runs 3 seeds x 64 envs = 192 episodes per task
PROTOCOLS: dict[str, dict[str, Any]] = {
    "rlinf-maniskill-PutOnPlateInScene25Main-v3": {
        "script": "ppo_openvla.py",
        "flags": {"env_id": "PutOnPlateInScene25Main-v3", "obj_set": "train", "eval_temperature": 0.6},
        "anchor_episodes": 192,
    },
    **{
        f"rlinf-maniskill-ood-{env_id}": {
            "script": "ppo_openvla.py",
            "flags": {"env_id": env_id, "obj_set": "test", "eval_temperature": 0.6},
            "anchor_episodes": 192,
        }
        for env_id in MANISKILL_OOD
    },
    # SimpleVLA-RL and SRPO on LIBERO: all 50 init states of all 10 tasks (500 episodes), greedy, 512 env steps for
    # every suite, 10 settle steps, the 0.9 center crop
    **{
        f"simplevla-rl-srpo-{suite}": {
            "script": "srpo_openvla_oft.py",
            "flags": {"suite": suite, "task_ids": ALL_TEN_TASKS, "eval_init_states": 50, "eval_temperature": 0.0}
            | {"max_episode_steps": 512, "oft_eval_max_steps": False, "center_crop": True},
            "anchor_episodes": 500,
        }
        for suite in LIBERO_SUITES
    },
    # the OpenVLA-OFT paper's LIBERO evaluation: the same episodes with its per-suite step limits
    **{
        f"openvla-oft-paper-{suite}": {
            "script": "srpo_openvla_oft.py",
            "flags": {"suite": suite, "task_ids": ALL_TEN_TASKS, "eval_init_states": 50, "eval_temperature": 0.0}
            | {"oft_eval_max_steps": True, "center_crop": True},
            "anchor_episodes": 500,
        }
        for suite in LIBERO_SUITES
    },
}
# what a ManiSkill protocol also fixes at its default: the episode length, the task's controller and instruction
MANISKILL_PROTOCOL_DEFAULTS = {"max_episode_steps": 80, "control_mode": None, "instruction": None}


def match_protocol(script: str, flags: dict[str, Any]) -> str:
    """The name of the PROTOCOLS row whose flags these are, or "custom"."""
    for name, protocol in PROTOCOLS.items():
        wanted = protocol["flags"]
        if protocol["script"] == "ppo_openvla.py":
            wanted = MANISKILL_PROTOCOL_DEFAULTS | wanted
        if protocol["script"] == script and all(flags.get(k, "missing") == v for k, v in wanted.items()):
            return name
    return "custom"


def summarize(episodes: list[dict], args, flags: tuple[str, ...], step: int) -> dict[str, Any]:
    """summary.json: overall and per-task success with 95% Wilson intervals, the flags that define the protocol and
    the protocol row they match, the checkpoint (--eval-only) and the git commit."""
    script = script_name()
    protocol_flags = {name: getattr(args, name) for name in flags}
    protocol = match_protocol(script, protocol_flags)
    tasks = sorted({r["task"] for r in episodes})
    summary = {
        "script": script,
        "step": step,
        "checkpoint": args.checkpoint if args.eval_only else None,  # during training: the weights of `step`
        "model_path": args.model_path,  # the base the checkpoint or training started from
        "commit": git_commit(),
        "protocol": protocol,
        "anchor_episodes": PROTOCOLS[protocol]["anchor_episodes"] if protocol != "custom" else None,
        "flags": protocol_flags,
        **proportion(episodes),
        "tasks": {task: proportion([r for r in episodes if r["task"] == task]) for task in tasks},
    }
    if "success_at_end" in episodes[0]:
        summary["success_at_end"] = proportion(episodes, "success_at_end")
    return summary


def eval_paths(run_path: str, step: int) -> tuple[str, str]:
    """{run}/eval/step_XXXXXXXX.jsonl (the episodes) and {run}/eval/step_XXXXXXXX.summary.json."""
    stem = os.path.join(run_path, "eval", f"step_{step:08d}")
    return f"{stem}.jsonl", f"{stem}.summary.json"


def write_evaluation(run_path: str, step: int, episodes: list[dict], summary: dict) -> str:
    """Write both files atomically (a killed job leaves the previous version or none); returns the records' path."""
    records_path, summary_path = eval_paths(run_path, step)
    os.makedirs(os.path.dirname(records_path), exist_ok=True)
    write_text_atomic(records_path, "".join(json.dumps(r) + "\n" for r in episodes))
    write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    return records_path


def read_evaluation(path: str) -> tuple[list[dict], dict]:
    """The episodes and summary of one evaluation: a .jsonl or .summary.json path, or a run directory (its newest)."""
    if os.path.isdir(path):
        eval_dir = os.path.join(path, "eval") if os.path.isdir(os.path.join(path, "eval")) else path
        records = sorted(f for f in os.listdir(eval_dir) if f.endswith(".jsonl"))
        if not records:
            raise FileNotFoundError(f"{path}: no eval/step_*.jsonl in it (is it a run directory?)")
        path = os.path.join(eval_dir, records[-1])
    stem = path.removesuffix(".jsonl").removesuffix(".summary.json")
    with open(f"{stem}.jsonl") as f:
        episodes = [json.loads(line) for line in f if line.strip()]
    with open(f"{stem}.summary.json") as f:
        return episodes, json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# Progress: a live bar on a terminal, a plain line every PROGRESS_LOG_S seconds in a log file (Slurm, Kubernetes)
# ---------------------------------------------------------------------------------------------------------------
PROGRESS_LOG_S = 30.0


class _Lines:
    """A stream for tqdm that writes each refresh as its own line (no carriage returns in a log file)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(total: int, desc: str, unit: str, enabled: bool) -> tqdm:
    """A tqdm bar on rank 0 (`enabled`; disabled elsewhere), shown once a call has run for 2 s (a terminal) or
    PROGRESS_LOG_S (a log file). Move it with `advance`."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, delay=2.0)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(sys.stderr),
        mininterval=PROGRESS_LOG_S,
        delay=PROGRESS_LOG_S,
        ncols=120,
    )


def advance(bar: tqdm, n: int, status: str) -> None:
    """n more units done; `status` (e.g. the running success) shows at the bar's next refresh."""
    bar.set_postfix_str(status, refresh=False)
    bar.update(n)
