"""Compare evaluations: the per-task table of one, or of two side by side with the difference and a two-proportion
test, and a bar chart with the 95% Wilson intervals.

    python -m common.eval_report runs/sft__s1 runs/grpo__s1 --out compare.png

Each evaluation is a run directory (its newest eval/step_*.jsonl), an eval/step_XXXXXXXX.jsonl or its .summary.json.
"""

import math
import os
from dataclasses import dataclass
from typing import Optional

import tyro

from common.evaluation import proportion, read_evaluation


@dataclass
class Args:
    a: tyro.conf.Positional[str]
    """an evaluation: a run directory, an eval/step_*.jsonl or an eval/step_*.summary.json"""
    b: tyro.conf.Positional[Optional[str]] = None
    """a second evaluation to compare with the first"""
    out: str = "eval_report.png"
    """where the bar chart goes"""


def two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test of k1/n1 = k2/n2 (a normal approximation: rough with
    fewer than ~5 successes or failures on a side)."""
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:  # all successes or all failures on both sides: no difference to test
        return 1.0
    z = (k2 / n2 - k1 / n1) / se
    return math.erfc(abs(z) / math.sqrt(2))


def by_task(episodes: list[dict]) -> dict[str, dict]:
    """proportion() per task, and "overall" over every episode."""
    tasks = sorted({r["task"] for r in episodes})
    return {task: proportion([r for r in episodes if r["task"] == task]) for task in tasks} | {
        "overall": proportion(episodes)
    }


def cell(stats: Optional[dict]) -> str:
    if stats is None:
        return "-"
    low, high = stats["ci95"]
    return f"{stats['success_rate']:.3f} [{low:.3f}, {high:.3f}] {stats['successes']}/{stats['episodes']}"


def table(first: dict[str, dict], second: Optional[dict[str, dict]] = None) -> str:
    """The per-task lines: success rate [95% Wilson interval] successes/episodes; with a second evaluation, the
    difference second - first and the test's p-value on tasks both have."""
    rows = list(first) if second is None else sorted(set(first) | set(second), key=lambda t: (t == "overall", t))
    width = max(len(r) for r in rows) + 2
    header = f"{'task':<{width}}{'A':<34}" + ("" if second is None else f"{'B':<34}{'B - A':>8}{'p':>8}")
    lines = [header]
    for task in rows:
        a = first.get(task)
        line = f"{task:<{width}}{cell(a):<34}"
        if second is not None:
            b = second.get(task)
            line += f"{cell(b):<34}"
            if a and b:
                diff = b["success_rate"] - a["success_rate"]
                p = two_proportion_p(a["successes"], a["episodes"], b["successes"], b["episodes"])
                line += f"{diff:>+8.3f}{p:>8.3f}"
        lines.append(line)
    return "\n".join(lines)


def chart(results: list[tuple[str, dict[str, dict]]], path: str) -> None:
    """Bars of each task's success rate per evaluation, with their 95% Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for _, stats in results for t in stats}, key=lambda t: (t == "overall", t))
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(tasks) * len(results)), 3.6))
    for i, (label, stats) in enumerate(results):
        xs = [j + (i - (len(results) - 1) / 2) * width for j, t in enumerate(tasks) if t in stats]
        rates = [stats[t]["success_rate"] for t in tasks if t in stats]
        below = [stats[t]["success_rate"] - stats[t]["ci95"][0] for t in tasks if t in stats]
        above = [stats[t]["ci95"][1] - stats[t]["success_rate"] for t in tasks if t in stats]
        ax.bar(xs, rates, width, yerr=[below, above], capsize=3, label=label)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("success rate (95% Wilson CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe(name: str, path: str, summary: dict) -> str:
    commit = (summary.get("commit") or "unknown")[:10]
    return (
        f"{name}: {path} ({summary['script']}, step {summary['step']}, protocol {summary['protocol']}, "
        f"{summary['episodes']} episodes, commit {commit})"
    )


def main(args: Args) -> None:
    paths = [p for p in (args.a, args.b) if p is not None]
    results = []
    for name, path in zip("AB", paths):
        episodes, summary = read_evaluation(path)
        print(describe(name, path, summary))
        results.append((f"{name}: {os.path.normpath(path)}", by_task(episodes)))
    print(table(*[stats for _, stats in results]))
    chart(results, args.out)
    print(f"chart: {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
