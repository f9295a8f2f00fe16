"""Learning curves on the CPU: each RL run next to an identical run with learning rate 0 (the control).

    python bench/learning_curves.py ppo --out bench/results/ppo            # PPO from scratch, PushCube-v1 dense
    python bench/learning_curves.py sft-ppo --out bench/results/sft_ppo    # demos -> SFT -> PPO vs control
    python bench/learning_curves.py sft-grpo --out bench/results/sft_grpo  # demos -> SFT -> GRPO vs control
    python bench/learning_curves.py plot --out bench/results/ppo           # redraw the PNG from curves.json

The control uses the same seed, so it sees the same env reset seeds and draws its actions from the same random
streams: with learning rate 0 its policy never changes, and its curve is what the initial policy scores on those
episodes. Any gap between the two curves is learning.

ppo: ppo_openvla.py from a tiny random OpenVLA (`common.models.tiny`), full fine-tuning, ManiSkill's normalized
dense reward on PushCube-v1 (the task's success is still logged as rollout/success_rate, and an evaluation
every --eval-interval iterations as eval/success_rate, success at any step: RLinf's protocol).

sft-ppo: collect_demos.py (scripted expert) -> sft_openvla.py from a tiny random OpenVLA (final model at
{run_dir}/sft__s{seed}/final, the demos' action statistics under `maniskill_{env_id}`) -> ppo_openvla.py from that
model with the task's sparse success reward (--reward-mode), next to the same command at learning rate 0: RL4VLA's
recipe (a warm-up SFT, then PPO) at CPU scale. Both PPO modes take --num-initial-states (train on reset seeds
0..K-1, as sft-grpo), --update-epochs, --num-minibatches, --gamma, --gae-lambda, --critic-warmup-iterations and
--no-bootstrap-truncated.

sft-grpo: collect_demos.py (scripted expert) -> sft_internvl.py (final model at {run_dir}/sft__s{seed}/final) ->
grpo_internvl.py from that model, next to grpo_internvl.py --learning-rate 0 from the same model. GRPO trains on a
fixed set of --num-initial-states initial states (reset seeds 0..K-1), so its rollout success is measured on the
states it trains on; evaluation uses held-out states. Without --model-path a tiny random InternVL is the SFT
starting point.

Each mode writes {out}/curves.json (every logged scalar of every run, against iteration and env steps) and
{out}/curves.png, and prints the wall time of every stage; models, logs and runs go to {out}/runs/ (git-ignored).
Runs go one after another (one simulator at a time).
"""

import argparse
import ast
import functools
import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(cmd: list[str], log_path: str) -> float:
    """Run a script from the repository root, output to log_path; returns the wall time in seconds."""
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"failed after {wall:.0f} s (exit {proc.returncode}), log {log_path}:\n{tail}")
    print(f"  {wall:.0f} s wall", flush=True)
    return wall


def read_scalars(run_path: str) -> dict[str, dict[int, float]]:
    """Every TensorBoard scalar of one run: {tag: {iteration: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for name in sorted(os.listdir(run_path)):
        if name.startswith("events.out.tfevents"):
            acc = EventAccumulator(os.path.join(run_path, name), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def series(scalars: dict, tag: str, env_steps: dict[int, int]) -> dict[str, list[float]]:
    """One tag as {"iteration", "env_steps" (cumulative at the end of the iteration), "value"} lists."""
    points = sorted(scalars.get(tag, {}).items())
    return {
        "iteration": [i for i, _ in points],
        "env_steps": [env_steps[i] for i, _ in points],
        "value": [v for _, v in points],
    }


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def head_mean(curve: dict, k: int) -> float:
    return mean(curve["value"][:k])


def tail_mean(curve: dict, k: int) -> float:
    return mean(curve["value"][-k:])


SMOOTH = 5  # iterations per moving-average point in the plots


def plot(curves: dict, panels: list[tuple[str, str]], title: str, path: str) -> None:
    """One panel per (tag, y label); trained and control runs against env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), dpi=80)
    for ax, (tag, label) in zip(axes, panels):
        for name, style, color in (("trained", "-", "C0"), ("control", "--", "C1")):
            curve = curves[name].get(tag)
            if not (curve and curve["value"]):
                continue
            legend = name if name == "trained" else "control (lr 0)"
            x, y = curve["env_steps"], curve["value"]
            if len(y) < 2 * SMOOTH:  # few points (evaluations): plain
                ax.plot(x, y, style, color=color, marker=".", label=legend)
                continue
            # noisy per-iteration values thin, their moving average over SMOOTH iterations bold
            ax.plot(x, y, style, color=color, alpha=0.3, linewidth=0.8)
            smooth = [sum(y[i - SMOOTH + 1 : i + 1]) / SMOOTH for i in range(SMOOTH - 1, len(y))]
            ax.plot(x[SMOOTH - 1 :], smooth, style, color=color, linewidth=2, label=f"{legend}, mean of {SMOOTH}")
        if "success" in tag:
            ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("env steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------------
# Provenance: what made a result, so `check` can tell when today's code would no longer make it
# ---------------------------------------------------------------------------------------------------------------
SCRIPTS = {
    "ppo": ["ppo_openvla.py"],
    "sft-ppo": ["collect_demos.py", "sft_openvla.py", "ppo_openvla.py"],
    "sft-grpo": ["collect_demos.py", "sft_internvl.py", "grpo_internvl.py"],
}
PACKAGES = ("torch", "transformers", "mani_skill", "sapien", "gymnasium", "numpy")


def depends_on(mode: str) -> list[str]:
    """The files a mode's numbers depend on: its scripts, this file, every project module they import (read from
    their import statements, transitively, package __init__ files included) and the pinned requirements."""

    def module_files(name: str) -> list[str]:
        parts, found = name.split("."), []
        for i in range(1, len(parts) + 1):
            stem = os.path.join(*parts[:i])
            found += [
                f for f in (stem + ".py", os.path.join(stem, "__init__.py")) if os.path.isfile(os.path.join(ROOT, f))
            ]
        return found

    todo, seen = [*SCRIPTS[mode], "bench/learning_curves.py"], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        with open(os.path.join(ROOT, path)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo += [f for alias in node.names for f in module_files(alias.name)]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo += module_files(node.module)
                todo += [f for alias in node.names for f in module_files(f"{node.module}.{alias.name}")]
    return sorted(seen) + ["requirements.txt"]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def provenance(mode: str) -> dict:
    """The commit, command and versions a result is made with. Refuses a checkout whose files this result depends
    on have uncommitted changes: the recorded commit would not be the code that ran."""
    from importlib.metadata import version

    dirty = git("status", "--porcelain", "--", *depends_on(mode))
    if dirty:
        raise SystemExit(f"uncommitted changes in files this result depends on; commit them first:\n{dirty}")
    return {
        "commit": git("rev-parse", "HEAD"),
        "commit_date": git("log", "-1", "--format=%cs"),
        "command": " ".join(["python", "bench/learning_curves.py", *sys.argv[1:]]),
        "argv": sys.argv[1:],
        "versions": {"python": sys.version.split()[0], **{p: version(p.replace("_", "-")) for p in PACKAGES}},
        "cpus": os.cpu_count(),
        "machine": machine(),
    }


def machine() -> dict:
    """What the simulator's physics and the CPU kernels' float results depend on beyond the packages: the CPU model,
    the instruction set PyTorch's kernels dispatch to, and the software Vulkan driver that renders the camera."""
    import torch

    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    mesa = (
        subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "mesa-vulkan-drivers"], capture_output=True, text=True
        ).stdout.strip()
        if shutil.which("dpkg-query")
        else ""
    )
    return {"cpu": cpu, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "mesa_vulkan": mesa or None}


def fingerprint(demos: str) -> dict:
    """The demos a run trained on: sha256 over the episode files in order, and their size. Two machines that give
    different demos from the same command simulate differently, and everything after differs too."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(demos)):
        if name.startswith("episode_"):
            with open(os.path.join(demos, name), "rb") as f:
                digest.update(f.read())
    with open(os.path.join(demos, "meta.json")) as f:
        meta = json.load(f)
    return {
        "sha256": digest.hexdigest(),
        "num_transitions": meta["action_norm_stats"]["num_transitions"],
        "expert_success_rate": meta.get("expert_success_rate"),
    }


def check(parser: argparse.ArgumentParser, paths: list[str]) -> int:
    """For each curves.json: is it what its recorded command gives on today's code? Stale when it records no
    provenance, when its command now parses to other settings, or when a file it depends on changed after its
    commit. Returns the number of stale results."""
    stale = 0
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        made, problems = results.get("provenance"), []
        if made is None:
            problems.append("records no commit or command (made before learning_curves.py recorded them)")
        else:
            today = vars(parser.parse_args(made["argv"]))
            changed = {k: (v, today.get(k)) for k, v in results["settings"].items() if today.get(k) != v}
            if changed:
                problems.append(f"its command now runs other settings (recorded, today): {changed}")
            later = git("log", "--format=%h %s", f"{made['commit']}..HEAD", "--", *depends_on(results["mode"]))
            if later:
                problems.append(
                    f"files it depends on changed after {made['commit'][:7]}:\n    " + "\n    ".join(later.splitlines())
                )
        stale += bool(problems)
        where = (
            f"made at {made['commit'][:7]} ({made['commit_date']}"
            + (f", {made['machine']['cpu']}, {made['machine']['torch_cpu_capability']})" if "machine" in made else ")")
            if made
            else "committed in " + git("log", "-1", "--format=%h (%cs)", "--", path)
        )
        print(f"{'STALE' if problems else 'ok   '} {os.path.relpath(path, ROOT)}: {where}")
        for problem in problems:
            print(f"      {problem}")
    return stale


def spread(paths: list[str]) -> None:
    """Each summary number over several results of one mode (e.g. one per --seed): every value, mean, min, max."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    modes = {r["mode"] for r in runs}
    if len(modes) > 1:
        raise SystemExit(f"spread: give results of one mode, got {sorted(modes)}")
    print("seeds:", [r["settings"]["seed"] for r in runs])
    rows = [("sft_eval_success_rate",)] if "sft_eval_success_rate" in runs[0] else []
    rows += [("summary", name, key) for name in runs[0]["summary"] for key in runs[0]["summary"][name]]

    def show(label: str, values: list) -> None:
        if all(isinstance(v, (int, float)) for v in values):
            each = " ".join(f"{v:.3f}" for v in values)
            print(f"{label:42s} {each}   mean {mean(values):.3f} min {min(values):.3f} max {max(values):.3f}")

    for row in rows:
        show(".".join(row[1:]) or row[0], [functools.reduce(lambda d, k: d[k], row, r) for r in runs])
    for key in runs[0]["summary"]["trained"]:
        if key.endswith(("first10", "last10")):
            show(
                f"trained - control {key}", [r["summary"]["trained"][key] - r["summary"]["control"][key] for r in runs]
            )


def finish(out: str, results: dict) -> None:
    """{out}/curves.json and {out}/curves.png; wall times and summary to stdout."""
    with open(os.path.join(out, "curves.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {os.path.join(out, 'curves.json')}")
    plot(results["curves"], results["panels"], results["title"], os.path.join(out, "curves.png"))
    keys = ("wall_s", "sft_eval_success_rate", "summary")
    print(json.dumps({k: results[k] for k in keys if k in results}, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# ppo: ppo_openvla.py from a tiny random OpenVLA on PushCube-v1, dense reward
# sft-ppo: collect_demos.py -> sft_openvla.py -> ppo_openvla.py vs ppo_openvla.py --learning-rate 0
# ---------------------------------------------------------------------------------------------------------------
PPO_TAGS = (
    "rollout/reward_mean",
    "rollout/success_rate",
    "rollout/return_mean",
    "eval/success_rate",
    "actor/approx_kl",
    "critic/explained_variance",
)


def ppo_pair(a: argparse.Namespace, model: str, extra: list[str], results: dict) -> None:
    """ppo_openvla.py from `model` and the same command at learning rate 0; curves and summary into `results`."""
    run_dir = os.path.join(a.out, "runs")
    common = [
        "--model-path",
        model,
        *extra,
        "--run-dir",
        run_dir,
        "--seed",
        str(a.seed),
        "--env-id",
        a.env_id,
        "--sim-backend",
        a.sim_backend,
        "--reward-mode",
        a.reward_mode,
        "--num-envs",
        str(a.num_envs),
        "--num-steps",
        str(a.num_steps),
        "--max-episode-steps",
        str(a.max_episode_steps),
        "--num-initial-states",
        str(a.num_initial_states),
        "--update-epochs",
        str(a.update_epochs),
        "--num-minibatches",
        str(a.num_minibatches),
        "--gamma",
        str(a.gamma),
        "--gae-lambda",
        str(a.gae_lambda),
        "--critic-warmup-iterations",
        str(a.critic_warmup_iterations),
        "--no-bootstrap-truncated" if a.no_bootstrap_truncated else "--bootstrap-truncated",
        "--micro-batch-size",
        str(a.num_envs * a.num_steps // a.num_minibatches),
        "--lora-rank",
        "0",
        "--image-size",
        str(a.image_size),
        "--total-iterations",
        str(a.iterations),
        "--eval-interval",
        str(a.eval_interval),
        "--save-interval",
        "0",
        "--keep-checkpoints",
        "1",
    ]
    runs = {
        "trained": ["--learning-rate", str(a.learning_rate)],
        "control": ["--learning-rate", "0", "--value-learning-rate", "0"],
    }
    env_steps = a.num_envs * a.num_steps  # episodes auto-reset, so every iteration takes num_steps in every env
    results["env_steps_per_iteration"] = env_steps
    for name, flags in runs.items():
        cmd = [sys.executable, "ppo_openvla.py", *common, "--exp-name", name, *flags]
        results["wall_s"][name] = run(cmd, os.path.join(run_dir, f"{name}.log"))
        scalars = read_scalars(os.path.join(run_dir, f"{name}__s{a.seed}"))
        cumulative = {i: i * env_steps for i in range(a.iterations + 1)}
        results["curves"][name] = {tag: series(scalars, tag, cumulative) for tag in PPO_TAGS}
    results["summary"] = {
        name: {
            "reward_per_step_first10": head_mean(c["rollout/reward_mean"], 10),
            "reward_per_step_last10": tail_mean(c["rollout/reward_mean"], 10),
            "success_rate_first10": head_mean(c["rollout/success_rate"], 10),
            "success_rate_last10": tail_mean(c["rollout/success_rate"], 10),
            "eval_success": c["eval/success_rate"]["value"],
        }
        for name, c in results["curves"].items()
    }
    results["panels"] = [
        ("rollout/reward_mean", f"{a.reward_mode} reward per step"),
        ("rollout/success_rate", "rollout success rate (T 1.0)"),
        ("eval/success_rate", "eval success (T 0.6, any step)"),
    ]


def starting_model(a: argparse.Namespace, family: str) -> str:
    """--model-path, or a tiny random model of `family` ("openvla" / "internvl") built once under {out}/runs/."""
    from common.models import tiny as tiny_models

    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    if a.model_path:
        return a.model_path
    path = os.path.join(a.out, "runs", f"tiny_{family}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        getattr(tiny_models, f"make_tiny_{family}")(path)
    return path


def ppo_mode(a: argparse.Namespace) -> None:
    model = starting_model(a, "openvla")
    results = {"mode": "ppo", "provenance": provenance("ppo"), "settings": vars(a), "wall_s": {}, "curves": {}}
    ppo_pair(a, model, [], results)
    results["title"] = (
        f"PPO from {a.model_path or 'a tiny random OpenVLA'}, {a.env_id} {a.reward_mode} reward, "
        f"{a.num_envs} envs x {a.num_steps} steps, seed {a.seed}"
    )
    finish(a.out, results)


def sft_ppo_mode(a: argparse.Namespace) -> None:
    base = starting_model(a, "openvla")
    results = {"mode": "sft-ppo", "provenance": provenance("sft-ppo"), "settings": vars(a), "wall_s": {}, "curves": {}}
    sft_model = demos_then_sft(a, "sft_openvla.py", base, results)
    # sft_openvla.py writes the demos' action statistics under this key (its default)
    ppo_pair(a, sft_model, ["--unnorm-key", f"maniskill_{a.env_id}".lower()], results)
    results["title"] = (
        f"SFT ({a.num_demos} demos) then PPO, {a.env_id} {a.reward_mode} reward, "
        f"{a.num_envs} envs x {a.num_steps} steps, seed {a.seed}"
    )
    finish(a.out, results)


# ---------------------------------------------------------------------------------------------------------------
# sft-grpo: collect_demos.py -> sft_internvl.py -> grpo_internvl.py vs grpo_internvl.py --learning-rate 0
# ---------------------------------------------------------------------------------------------------------------
GRPO_TAGS = (
    "rollout/success_rate",
    "rollout/reward_mean",
    "eval/success_rate",
    "rollout/kept_groups_frac",
    "rollout/entropy",
    "actor/approx_kl",
)


def demos_then_sft(a: argparse.Namespace, script: str, base: str, results: dict) -> str:
    """collect_demos.py, then `script` (sft_internvl.py / sft_openvla.py) from `base` on the demos, with a greedy
    simulator evaluation at the end only; returns the final model's directory."""
    if not os.path.isfile(os.path.join(ROOT, script)):
        raise SystemExit(f"{script} is not in this checkout: the {a.mode} mode needs it")
    run_dir = os.path.join(a.out, "runs")
    demos = os.path.join(run_dir, "demos")
    results["wall_s"]["collect_demos"] = run(
        [
            sys.executable,
            "collect_demos.py",
            "--env-id",
            a.env_id,
            "--num-episodes",
            str(a.num_demos),
            "--image-size",
            str(a.image_size),
            "--max-episode-steps",
            str(a.max_episode_steps),
            "--out-dir",
            demos,
        ],
        os.path.join(run_dir, "collect_demos.log"),
    )
    results["demos"] = fingerprint(demos)
    results["wall_s"]["sft"] = run(
        [
            sys.executable,
            script,
            "--demos",
            demos,
            "--sim-backend",
            a.sim_backend,
            "--model-path",
            base,
            "--run-dir",
            run_dir,
            "--exp-name",
            "sft",
            "--seed",
            str(a.seed),
            "--lora-rank",
            str(a.lora_rank),
            "--num-epochs",
            str(a.sft_epochs),
            "--learning-rate",
            str(a.sft_learning_rate),
            "--batch-size",
            str(a.sft_batch_size),
            "--micro-batch-size",
            str(a.sft_batch_size),
            "--num-envs",
            str(a.sft_eval_envs),
            "--max-episode-steps",
            str(a.max_episode_steps),
            "--eval-interval",
            "0",
            "--save-interval",
            "0",
            "--keep-checkpoints",
            "1",
        ],
        os.path.join(run_dir, "sft.log"),
    )
    sft_scalars = read_scalars(os.path.join(run_dir, f"sft__s{a.seed}"))
    results["sft_eval_success_rate"] = (list(sft_scalars.get("eval/success_rate", {}).values()) or [None])[-1]
    return os.path.join(run_dir, f"sft__s{a.seed}", "final")


def sft_grpo_mode(a: argparse.Namespace) -> None:
    base = starting_model(a, "internvl")
    run_dir = os.path.join(a.out, "runs")
    results = {
        "mode": "sft-grpo",
        "provenance": provenance("sft-grpo"),
        "settings": vars(a),
        "wall_s": {},
        "curves": {},
    }
    # 1. demonstrations from the scripted expert, 2. SFT on them
    sft_model = demos_then_sft(a, "sft_internvl.py", base, results)
    # 3. GRPO from the SFT model, next to the same run with learning rate 0
    common = [
        "--model-path",
        sft_model,
        "--run-dir",
        run_dir,
        "--seed",
        str(a.seed),
        "--env-id",
        a.env_id,
        "--sim-backend",
        a.sim_backend,
        "--num-envs",
        str(a.num_envs),
        "--group-size",
        str(a.group_size),
        "--max-episode-steps",
        str(a.max_episode_steps),
        "--image-size",
        str(a.image_size),
        "--lora-rank",
        str(a.lora_rank),
        "--temperature",
        str(a.temperature),
        "--num-initial-states",
        str(a.num_initial_states),
        "--loss-agg-mode",
        a.loss_agg_mode,
        "--total-iterations",
        str(a.iterations),
        "--micro-batch-size",
        str(a.grpo_micro_batch_size),
        "--eval-interval",
        str(a.eval_interval),
        "--save-interval",
        "0",
        "--keep-checkpoints",
        "1",
    ]
    runs = {"trained": ["--learning-rate", str(a.learning_rate)], "control": ["--learning-rate", "0"]}
    for name, extra in runs.items():
        cmd = [sys.executable, "grpo_internvl.py", *common, "--exp-name", f"grpo_{name}", *extra]
        results["wall_s"][name] = run(cmd, os.path.join(run_dir, f"grpo_{name}.log"))
        scalars = read_scalars(os.path.join(run_dir, f"grpo_{name}__s{a.seed}"))
        # env steps actually taken: episodes end at the first success, so num_envs x the mean episode length
        cumulative, total = {}, 0
        for i, length in sorted(scalars["rollout/episode_length"].items()):
            total += round(length * a.num_envs)
            cumulative[i] = total
        results["curves"][name] = {tag: series(scalars, tag, cumulative) for tag in GRPO_TAGS}
    results["summary"] = {
        name: {
            "success_rate_first10": head_mean(c["rollout/success_rate"], 10),
            "success_rate_last10": tail_mean(c["rollout/success_rate"], 10),
            "eval_success_final": (c["eval/success_rate"]["value"] or [float("nan")])[-1],
        }
        for name, c in results["curves"].items()
    }
    results["panels"] = [
        ("rollout/success_rate", f"rollout success rate (T {a.temperature})"),
        ("eval/success_rate", f"greedy eval success ({a.num_envs} held-out)"),
    ]
    states = f"{a.num_initial_states} initial states" if a.num_initial_states else "fresh initial states"
    results["title"] = f"SFT ({a.num_demos} demos) then GRPO on {states}, {a.env_id}, seed {a.seed}"
    finish(a.out, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    ppo = modes.add_parser("ppo", help="PPO from a tiny random OpenVLA vs its lr-0 control")
    ppo.add_argument("--out", default="bench/results/ppo")
    ppo.add_argument("--model-path", default=None, help="OpenVLA checkpoint (default: a tiny random one)")
    sft_ppo = modes.add_parser("sft-ppo", help="demos -> SFT -> PPO vs its lr-0 control")
    sft_ppo.add_argument("--out", default="bench/results/sft_ppo")
    sft_ppo.add_argument("--model-path", default=None, help="OpenVLA checkpoint to SFT (default: a tiny random one)")
    sft = modes.add_parser("sft-grpo", help="demos -> SFT -> GRPO vs its lr-0 control")
    sft.add_argument("--out", default="bench/results/sft_grpo")
    sft.add_argument("--model-path", default=None, help="InternVL -hf checkpoint to SFT (default: a tiny random one)")
    for mode in (ppo, sft_ppo, sft):
        mode.add_argument("--env-id", default="PushCube-v1")
        mode.add_argument("--seed", type=int, default=1)
        mode.add_argument("--image-size", type=int, default=64)
        mode.add_argument("--eval-interval", type=int, default=10)
        mode.add_argument("--sim-backend", default="auto", choices=["auto", "cpu", "gpu"], help="the scripts' flag")
    for mode in (sft_ppo, sft):
        mode.add_argument("--num-demos", type=int, default=100)
        mode.add_argument("--sft-learning-rate", type=float, default=1e-3)
        mode.add_argument("--sft-batch-size", type=int, default=16)
        mode.add_argument("--sft-eval-envs", type=int, default=16, help="held-out episodes of the final SFT eval")
        mode.add_argument("--lora-rank", type=int, default=0, help="SFT LoRA rank (0: full fine-tuning)")
    ppo.add_argument("--iterations", type=int, default=60)
    ppo.add_argument("--num-steps", type=int, default=20)
    ppo.add_argument("--max-episode-steps", type=int, default=20)
    ppo.add_argument("--learning-rate", type=float, default=3e-4)
    sft_ppo.add_argument("--sft-epochs", type=float, default=40.0)
    sft_ppo.add_argument("--iterations", type=int, default=30)
    sft_ppo.add_argument("--num-steps", type=int, default=40)
    sft_ppo.add_argument("--max-episode-steps", type=int, default=40)
    sft_ppo.add_argument("--learning-rate", type=float, default=3e-4)
    for mode, reward in ((ppo, "dense"), (sft_ppo, "sparse")):
        mode.add_argument("--num-envs", type=int, default=8)
        mode.add_argument("--reward-mode", default=reward, choices=["dense", "sparse"])
        mode.add_argument("--num-initial-states", type=int, default=0, help="0: a fresh reset seed per episode")
        mode.add_argument("--update-epochs", type=int, default=1)
        mode.add_argument("--num-minibatches", type=int, default=2)
        mode.add_argument("--gamma", type=float, default=0.99)
        mode.add_argument("--gae-lambda", type=float, default=0.95)
        mode.add_argument("--critic-warmup-iterations", type=int, default=0)
        mode.add_argument("--no-bootstrap-truncated", action="store_true", help="ppo_openvla.py's flag of that name")
    sft.add_argument("--sft-epochs", type=float, default=12.0)
    sft.add_argument("--iterations", type=int, default=30)
    sft.add_argument("--num-envs", type=int, default=16)
    sft.add_argument("--group-size", type=int, default=8)
    sft.add_argument("--max-episode-steps", type=int, default=40)
    sft.add_argument("--learning-rate", type=float, default=1e-4)
    sft.add_argument("--temperature", type=float, default=1.0, help="GRPO rollout temperature (the script's: 1.6)")
    sft.add_argument(
        "--num-initial-states", type=int, default=4, help="GRPO trains on env reset seeds 0..K-1 (0: fresh seeds)"
    )
    sft.add_argument(
        "--loss-agg-mode",
        default="token-mean",
        choices=["token-mean", "seq-mean-token-mean"],
        help="GRPO loss aggregation (the curves in docs/results.md used token-mean)",
    )
    sft.add_argument("--grpo-micro-batch-size", type=int, default=32)
    replot = modes.add_parser("plot", help="redraw {out}/curves.png from {out}/curves.json")
    replot.add_argument("--out", required=True)
    stale = modes.add_parser("check", help="which stored results today's code would no longer give (exit 1 if any)")
    stale.add_argument("paths", nargs="*", help="curves.json files (default: every one under bench/results)")
    across = modes.add_parser("spread", help="summary numbers over several curves.json (e.g. seeds)")
    across.add_argument("paths", nargs="+")
    a = parser.parse_args()
    start = time.time()
    if a.mode == "spread":
        return spread(a.paths)
    if a.mode == "check":
        paths = a.paths or sorted(
            glob.glob(os.path.join(ROOT, "bench", "results", "**", "curves.json"), recursive=True)
        )
        raise SystemExit(1 if check(parser, paths) else 0)
    if a.mode == "plot":
        with open(os.path.join(a.out, "curves.json")) as f:
            results = json.load(f)
        plot(results["curves"], results["panels"], results["title"], os.path.join(a.out, "curves.png"))
    else:
        {"ppo": ppo_mode, "sft-ppo": sft_ppo_mode, "sft-grpo": sft_grpo_mode}[a.mode](a)
    print(f"total {time.time() - start:.0f} s wall")


if __name__ == "__main__":
    main()
