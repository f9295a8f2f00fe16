"""Where an RL iteration's time goes, and the host work of one decode step, for PPO, GRPO and SRPO.

    python bench/bench_rollout.py --size tiny                     # CPU: tiny models, real simulators
    python bench/bench_rollout.py --size small --parts decode     # bigger models: compute, not Python, dominates
    python bench/bench_rollout.py --before e08c2ac                # also the code of that commit, ratios in one run

decode (in this process): PPO's `ActorCritic.act` (prefill, then one one-token forward for each of the other 6
action tokens) and GRPO's `generate_actions` (prefill, then one forward per free slot), LoRA adapters unmerged as in
the rollout. A step runs from one language-model call to the next, the sampling between them included; per step:
the ATen operators dispatched (counted by a TorchDispatchMode) and the wall time (median over --repeats, measured
without the counter). On the CPU all of it is host time; bench/gpu_check.py splits prefill and decode on a GPU.

iteration (subprocesses): each script's own command for 2 iterations on its real simulator: PPO and GRPO on
ManiSkill PushCube-v1 (CPU workers), SRPO on LIBERO libero_spatial task 0 with the V-JEPA 2 progress reward (4 envs,
256-step episodes, the quickstart's models). Reported: the second iteration's time/rollout_s, time/reward_s and
time/update_s from the script's TensorBoard logs (SRPO embeds the last wave's videos inside reward_s, the others
while the next wave rolls out, so compare rollout_and_reward_s), and every other scalar both iterations logged:
with --before, a speed change that keeps the numbers shows none of them changed. On 2 cores PPO and GRPO take
2-3 minutes each, SRPO longer.

A script that has --pipeline-stages also runs with --pipeline-stages 1 (name_stages1): the ratio shows what the
overlap of policy and env workers gives.

--before REV runs every measurement again on a git worktree of REV and prints before/after ratios (fewer
operators, less time). Writes the JSON to --out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# decode: operators and time per step, in this process, on the code under --code-root
# ---------------------------------------------------------------------------------------------------------------
class Steps:
    """Split a decode call at the forwards of `module` (the language model): step 0, the prefill, runs from the
    call's start to the second forward; step i from forward i to forward i + 1; the last one to the call's end."""

    def __init__(self, module):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            n = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Count.n += 1
                return func(*args, **(kwargs or {}))

        self.Count, self.module = Count, module

    def split(self, call, clock) -> list[float]:
        """clock() differences over the steps of one call()."""
        marks = [clock()]
        handle = self.module.register_forward_pre_hook(lambda *_: marks.append(clock()))
        try:
            call()
        finally:
            handle.remove()
        marks.append(clock())
        del marks[1]  # the prefill step: from the call's start (vision and embedding) to the second forward
        return [b - a for a, b in zip(marks, marks[1:])]

    def measure(self, call, repeats: int) -> dict:
        with self.Count():
            counts = self.split(call, lambda: self.Count.n)
        seconds = [self.split(call, time.perf_counter) for _ in range(repeats)]
        per_step = [statistics.median(s[i] for s in seconds) for i in range(len(counts))]
        return {
            "steps": len(counts),
            "prefill_ops": counts[0],
            "decode_ops_per_step": statistics.mean(counts[1:]),
            "prefill_ms": per_step[0] * 1e3,
            "decode_ms_per_step": statistics.mean(per_step[1:]) * 1e3,
        }


def small_internvl(path: str) -> str:
    """The tiny InternVL's tokenizer and processor with wider, deeper random weights (a 112 px vision tower)."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig.from_pretrained(path)
    wider = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    config.vision_config.update(wider)
    config.text_config.update(wider)
    config.text_config.layer_types = ["full_attention"] * wider["num_hidden_layers"]  # one per layer
    torch.manual_seed(0)
    InternVLForConditionalGeneration(config).save_pretrained(path)
    return path


def decode_part(size: str, batch: int, repeats: int, tmp: str) -> dict:
    import torch

    import grpo_internvl as grpo
    from common.models.action_text import build_inputs
    from common.models.openvla import ActionTokenizer, load_openvla, make_trainable
    from common.models.tiny import make_tiny_internvl, make_tiny_openvla
    from ppo_openvla import ActorCritic

    torch.manual_seed(0)
    out = {}
    dims = (
        dict(hidden_size=64, num_layers=2, vision_dim=32)
        if size == "tiny"
        else dict(hidden_size=256, num_layers=4, vision_dim=128)
    )
    vla, processor = load_openvla(make_tiny_openvla(os.path.join(tmp, f"openvla_{size}"), **dims), device="cpu")
    make_trainable(vla, 8, 16)
    policy = ActorCritic(vla, ActionTokenizer(vla.vocab_size, 256)).eval()
    prompt = processor.prompt_ids(["push the cube to the goal"] * batch)
    pixels = processor.preprocess_images(torch.randint(0, 256, (batch, 64, 64, 3), dtype=torch.uint8))
    out["ppo"] = Steps(vla.language_model.model).measure(lambda: policy.act(pixels, *prompt, 1.0), repeats)

    path = make_tiny_internvl(os.path.join(tmp, f"internvl_{size}"), image_size=56 if size == "tiny" else 112)
    if size == "small":
        small_internvl(path)
    processor, template = grpo.load_processor_and_template(path)
    args = grpo.Args(model_path=path, lora_rank=8)
    model = grpo.load_policy(args, torch.device("cpu"), None).eval()
    rgb = torch.randint(0, 256, (batch, 64, 64, 3), dtype=torch.uint8)
    inputs = build_inputs(processor, ["push the cube to the goal"] * batch, rgb, torch.rand(batch, 7), "cpu")
    out["grpo"] = Steps(model.get_base_model().model.language_model).measure(
        lambda: grpo.generate_actions(model, inputs, template, 1.0, 0, 1.0), repeats
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# iteration: each script's CLI for 2 iterations, times read from its TensorBoard logs
# ---------------------------------------------------------------------------------------------------------------
def commands(models: dict) -> dict[str, list[str]]:
    common = ["--total-iterations", "2", "--eval-interval", "0", "--save-interval", "0", "--lora-rank", "8"]
    return {
        "ppo": ["ppo_openvla.py", "--model-path", models["openvla"], "--env-id", "PushCube-v1", "--num-envs", "4",
                "--num-steps", "16", "--max-episode-steps", "16", "--num-minibatches", "2", *common],
        "grpo": ["grpo_internvl.py", "--model-path", models["internvl"], "--env-id", "PushCube-v1", "--num-envs", "4",
                 "--group-size", "2", "--max-episode-steps", "16", "--num-minibatches", "2", "--no-dynamic-sampling",
                 *common],
        "srpo": ["srpo_openvla_oft.py", "--model-path", models["openvla"], "--world-model-path", models["vjepa2"],
                 "--suite", "libero_spatial", "--task-ids", "0", "--num-envs", "4", "--group-size", "4",
                 "--tasks-per-iteration", "1", "--max-episode-steps", "256", "--no-dynamic-sampling",
                 "--eval-init-states", "1", "--no-capture-video", *common],  # the final evaluation: one wave
    }  # fmt: skip


def iteration_part(code_root: str, scripts: list[str], tmp: str) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from learning_curves import read_scalars

    models = {}
    for kind in ("openvla", "internvl", "vjepa2"):
        models[kind] = os.path.join(tmp, f"models_{kind}")
        subprocess.run([sys.executable, "-m", "common.models.tiny", kind, models[kind]], cwd=code_root, check=True,
                       capture_output=True)  # fmt: skip
    runs = {}
    for name in scripts:
        runs[name] = commands(models)[name]
        with open(os.path.join(code_root, runs[name][0])) as f:
            if "pipeline_stages" in f.read():  # the code has --pipeline-stages: also run without the overlap
                runs[f"{name}_stages1"] = [*runs[name], "--pipeline-stages", "1"]
    out = {}
    for name, script_command in runs.items():
        run_dir = os.path.join(tmp, f"runs_{name}")
        command = [sys.executable, *script_command, "--run-dir", run_dir, "--exp-name", name]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=code_root, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        scalars = read_scalars(os.path.join(run_dir, f"{name}__s1"))
        out[name] = {"wall_s": time.perf_counter() - start}
        for tag in ("time/rollout_s", "time/reward_s", "time/update_s"):
            if tag in scalars:
                out[name][tag.split("/")[1]] = scalars[tag][max(scalars[tag])]
        out[name]["rollout_and_reward_s"] = out[name]["rollout_s"] + out[name].get("reward_s", 0.0)
        print(f"  {name}: {out[name]}", flush=True)
        # what the run computed (every scalar but the timings, both iterations): a speed change must keep these
        out[name]["numbers"] = {t: [v[k] for k in sorted(v)] for t, v in scalars.items() if not t.startswith("time/")}
    return out


def measure(args) -> dict:
    """Every part on the code under args.code_root (this process imports from there)."""
    sys.path.insert(0, args.code_root)
    os.chdir(args.code_root)
    import torch

    torch.set_num_threads(os.cpu_count())
    result = {"code_root": args.code_root}
    with tempfile.TemporaryDirectory() as tmp:
        if "decode" in args.parts:
            result["decode"] = decode_part(args.size, args.batch_size, args.repeats, tmp)
            print(f"  decode: {result['decode']}", flush=True)
        if "iteration" in args.parts:
            result["iteration"] = iteration_part(args.code_root, args.scripts, tmp)
    return result


def ratios(before: dict, after: dict) -> dict:
    """before / after of every operator count and time both measured (> 1: the code after is faster / leaner)."""
    out = {}
    for part in ("decode", "iteration"):
        for script, numbers in after.get(part, {}).items():
            for key, value in numbers.items():
                old = before.get(part, {}).get(script, {}).get(key)
                if isinstance(value, (int, float)) and old and value and key != "steps":
                    out[f"{part}/{script}/{key}"] = old / value
    return out


def pipeline_ratios(after: dict) -> dict:
    """--pipeline-stages 1 time / default time, for each script run both ways (> 1: the overlap helps)."""
    runs = after.get("iteration", {})
    return {
        f"iteration/{name}/{key}_stages1_vs_default": runs[f"{name}_stages1"][key] / runs[name][key]
        for name in runs
        if f"{name}_stages1" in runs
        for key in ("rollout_s", "rollout_and_reward_s")
    }


def changed_numbers(before: dict, after: dict) -> dict:
    """Per script run before and after: the logged scalars (timings aside) whose values differ, with the largest
    difference. The after run without the pipeline overlap is compared where there is one (a sampled episode draws its
    random numbers per group of envs, so the default pipelined run samples other actions)."""
    out = {}
    runs = after.get("iteration", {})
    for script, numbers in before.get("iteration", {}).items():
        now = runs.get(f"{script}_stages1", runs.get(script))
        if now is None:
            continue
        now, old = now["numbers"], numbers["numbers"]
        differ = {
            tag: max(abs(a - b) for a, b in zip(values, old[tag]))
            for tag, values in now.items()
            if tag in old and values != old[tag]
        }
        out[script] = {"compared": len(set(now) & set(old)), "differ": differ}
    return out


def git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny", help="decode part's model size")
    parser.add_argument("--parts", nargs="+", choices=["decode", "iteration"], default=["decode", "iteration"])
    parser.add_argument("--scripts", nargs="+", choices=["ppo", "grpo", "srpo"], default=["ppo", "grpo", "srpo"])
    parser.add_argument("--batch-size", type=int, default=8, help="decode part's batch")
    parser.add_argument("--repeats", type=int, default=5, help="decode part's timed repeats (the median is kept)")
    parser.add_argument("--before", default=None, help="a git revision to measure too, in a worktree")
    parser.add_argument("--code-root", default=ROOT, help=argparse.SUPPRESS)  # the checkout measured (internal)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)  # where a --code-root run writes (internal)
    parser.add_argument("--out", default="bench_rollout.json")
    args = parser.parse_args()
    if args.before and subprocess.run(["git", "rev-parse", "--verify", "-q", f"{args.before}^{{commit}}"], cwd=ROOT,
                                      capture_output=True).returncode:  # fmt: skip
        parser.error(f"--before {args.before!r} is not a commit of this repository (e.g. a hash or HEAD~3)")
    if args.json:  # one checkout's measurements, for the parent process
        with open(args.json, "w") as f:
            json.dump(measure(args), f)
        return

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        trees = {"after": (git("rev-parse", "--short", "HEAD") + ("+uncommitted" if dirty else ""), ROOT)}
        if args.before:
            tree = os.path.join(tmp, "before")
            git("worktree", "add", "--detach", tree, args.before)
            trees = {"before": (git("rev-parse", "--short", args.before), tree), **trees}
        try:
            for name, (commit, tree) in trees.items():
                print(f"{name}: {commit} ({tree})", flush=True)
                path = os.path.join(tmp, f"{name}.json")
                subprocess.run(
                    [sys.executable, __file__, *sys.argv[1:], "--code-root", tree, "--json", path], check=True
                )
                with open(path) as f:
                    runs[name] = {"commit": commit, **json.load(f)}
        finally:
            if args.before:
                git("worktree", "remove", "--force", os.path.join(tmp, "before"))
    import torch

    result = {"size": args.size, "batch_size": args.batch_size, "cpus": os.cpu_count(), "torch": torch.__version__,
              **runs}  # fmt: skip
    result["ratios"] = pipeline_ratios(runs["after"])
    if "before" in runs:
        result["ratios"] |= ratios(runs["before"], runs["after"])
        result["changed_numbers"] = changed_numbers(runs["before"], runs["after"])
        for script, c in result["changed_numbers"].items():
            same = "the same as before" if not c["differ"] else f"DIFFERENT: {c['differ']}"
            print(f"iteration/{script}: {c['compared']} logged scalars (timings aside), {same}")
    for key, value in result["ratios"].items():
        print(f"{key}: {value:.2f}x")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
