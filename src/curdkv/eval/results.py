"""From predictions to the outputs people read: summary.csv, a Markdown table, a plot."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from ..report import markdown_table, pyplot

SUMMARY_COLUMNS = ("model", "task", "length", "press", "compression_ratio", "score", "n", "fidelity", "calibrated")


def summarize(records: list[dict]) -> list[dict]:
    """Mean score per (model, task, length, press, ratio), with fidelity.

    Fidelity (in %) is how often a configuration's answer equals the full
    cache's answer to the same sample (the CurDKV paper reports it).
    A context-calibrated press (its records carry ``calibration_tolerance``)
    makes one row whose ratio is the mean of the ratios it chose, with
    ``calibrated`` set to its tolerance.
    """
    full = {(r["model"], r["task"], r["length"], r["index"]): r["prediction"] for r in records if r["press"] == "full"}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        ratio = None if "calibration_tolerance" in r else float(r["compression_ratio"])
        groups[(r["model"], r["task"], r["length"], r["press"], ratio)].append(r)
    # Tasks and presses keep the order the run used (first appearance), not the alphabet.
    task_rank = {t: i for i, t in enumerate(dict.fromkeys(r["task"] for r in records))}
    press_rank = {p: i for i, p in enumerate(dict.fromkeys(r["press"] for r in records))}
    order = sorted(groups, key=lambda k: (k[0], task_rank[k[1]], k[2], press_rank[k[3]], k[4] or 0.0))
    rows = []
    for (model, task, length, press, ratio) in order:
        rs = groups[(model, task, length, press, ratio)]
        agree = [
            r["prediction"].strip() == full[(model, task, length, r["index"])].strip()
            for r in rs
            if (model, task, length, r["index"]) in full
        ]
        calibrated = rs[0].get("calibration_tolerance") if ratio is None else None
        if ratio is None:
            ratio = sum(float(r["compression_ratio"]) for r in rs) / len(rs)
        rows.append(
            {
                "model": model, "task": task, "length": length, "press": press, "compression_ratio": ratio,
                "score": sum(r["score"] for r in rs) / len(rs), "n": len(rs),
                "fidelity": 100 * sum(agree) / len(agree) if agree else math.nan, "calibrated": calibrated,
            }
        )
    return rows


def write_summary_csv(rows: list[dict], path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (round(row[k], 4) if isinstance(row[k], float) else row.get(k)) for k in SUMMARY_COLUMNS})


def _press_order(rows: list[dict]) -> list[str]:
    seen = []
    for r in rows:
        if r["press"] not in seen and r["press"] != "full":
            seen.append(r["press"])
    return seen


def _average_rows(tasks, presses, value, averages) -> list[dict]:
    body = []
    for label, members in (averages or {}).items():
        used = [t for t in members if t in tasks]
        if not used:
            continue
        avg = {}
        for p in presses:
            vals = [value(t, p) for t in used]
            avg[p] = sum(vals) / len(vals) if all(v is not None for v in vals) else None
        body.append({"task": f"**{label}** ({len(used)} tasks)", **avg})
    return body


def _calibrated_block(rows, tasks, length, averages, metric, title) -> str | None:
    """Context-calibrated presses: one column each, headed by the mean ratio they chose."""
    chosen = [r for r in rows if r.get("calibrated") is not None and r["length"] == length]
    if not chosen:
        return None
    presses = _press_order(chosen)
    cell = {(r["task"], r["press"]): r[metric] for r in chosen}
    cell.update({(r["task"], "full"): r[metric] for r in rows if r["press"] == "full" and r["length"] == length})
    ratio = {p: [r["compression_ratio"] for r in chosen if r["press"] == p] for p in presses}
    heads = {p: f"{p} (mean ratio {sum(ratio[p]) / len(ratio[p]):.0%})" for p in presses}
    columns = ["full"] + presses

    def value(task, press):
        return cell.get((task, press))

    body = [{"task": t, **{p: value(t, p) for p in columns}} for t in tasks]
    body += _average_rows(tasks, columns, value, averages)
    return title + "\n\n" + markdown_table(body, [("task", "task"), ("full", "full")] + [(p, heads[p]) for p in presses])


def results_table(rows: list[dict], averages: dict[str, list[str]] | None = None, metric: str = "score") -> str:
    """Rows tasks, columns presses (full cache first), one block per ratio, average rows last.

    ``averages``: label -> tasks averaged under that label (tasks missing from
    the results are left out of the average and the label says how many it used).
    """
    fixed = [r for r in rows if r.get("calibrated") is None]
    presses = ["full"] + _press_order(fixed)
    ratios = sorted({r["compression_ratio"] for r in fixed if r["press"] != "full"})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    cell = {(r["task"], r["length"], r["press"], r["compression_ratio"]): r[metric] for r in fixed}
    blocks = []
    for length in lengths:
        for ratio in ratios:
            def value(task, press):
                return cell.get((task, length, press, 0.0 if press == "full" else ratio))

            body = [{"task": t, **{p: value(t, p) for p in presses}} for t in tasks]
            body += _average_rows(tasks, presses, value, averages)
            title = f"### {length} tokens, compression {ratio:.0%}" if len(lengths) > 1 else f"### compression {ratio:.0%}"
            blocks.append(title + "\n\n" + markdown_table(body, [("task", "task")] + [(p, p) for p in presses]))
        title = f"### {length} tokens, context-calibrated ratio" if len(lengths) > 1 else "### context-calibrated ratio"
        block = _calibrated_block(rows, tasks, length, averages, metric, title)
        if block:
            blocks.append(block)
    return "\n\n".join(blocks)


def widest_average(averages: dict[str, list[str]] | None) -> tuple[str, list[str] | None]:
    """The name and tasks of the average over the most tasks, which the plot shows: ``("average", None)`` (every task) without averages.

    RULER's are ``niah`` (8 tasks) and ``ruler`` (13): the plot shows the
    13-task average that the tables and papers quote.
    """
    if not averages:
        return "average", None
    return max(averages.items(), key=lambda item: len(item[1]))


def plot_average_vs_ratio(rows: list[dict], path, tasks: list[str] | None = None, title: str = "",
                          ylabel: str = "average score") -> None:
    """Average score over ``tasks`` (default: all) against compression ratio, one line per press."""
    plt = pyplot()
    chosen = [r for r in rows if tasks is None or r["task"] in tasks]
    by_press: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    calibrated: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in chosen:
        if r.get("calibrated") is not None:
            calibrated[r["press"]].append((r["compression_ratio"], r["score"]))
        else:
            by_press[r["press"]][r["compression_ratio"]].append(r["score"])
    full = by_press.pop("full", None)
    many = len(by_press) + len(calibrated) > 8
    fig, ax = plt.subplots(figsize=(10 if many else 7, 4.5))
    # More lines than the default ten colours: tab20, and markers that differ too.
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"
    for i, (press, points) in enumerate(by_press.items()):
        xs = sorted(points)
        ys = [sum(points[x]) / len(points[x]) for x in xs]
        if full:
            xs, ys = [0.0] + xs, [sum(full[0.0]) / len(full[0.0])] + ys
        ax.plot([100 * x for x in xs], ys, marker=markers[i % len(markers)], color=colours[i % len(colours)],
                 label=press)
    for press, points in calibrated.items():
        # One point: the mean ratio it chose and its mean score.
        x = sum(p[0] for p in points) / len(points)
        y = sum(p[1] for p in points) / len(points)
        ax.plot([100 * x], [y], marker="*", markersize=14, linestyle="none", color="black",
                label=press if len(press) <= 40 else press.split(":")[0] + " @" + press.rsplit("@", 1)[-1])
    if full:
        ax.axhline(sum(full[0.0]) / len(full[0.0]), color="black", linestyle="--", linewidth=1, label="full cache")
    ax.set_xlabel("compression ratio (% of context tokens removed)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prefill_costs(records: list[dict]) -> list[dict]:
    """Per press: the median over samples of (prefill + compression) / prefill, a multiple of the prefill.

    A sample's compression is its press's most expensive build over the ratios
    run (the one that scored; the others reuse its scores), so the figure is
    what compressing one context at one ratio costs. Records without timings
    (runs made before they were recorded) are left out.
    """
    per_sample: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["press"] != "full" and "prefill_seconds" in r:
            per_sample[(r["press"], r["model"], r["task"], r["length"], r["index"])].append(r)
    ratios: dict[str, list[float]] = defaultdict(list)
    for (press, *_), rs in per_sample.items():
        prefill = rs[0]["prefill_seconds"]
        if prefill > 0:
            ratios[press].append((prefill + max(r["compression_seconds"] for r in rs)) / prefill)
    return [{"press": p, "prefill_cost": sorted(v)[len(v) // 2], "samples": len(v)} for p, v in ratios.items()]


def write_outputs(records: list[dict], out_dir, averages: dict[str, list[str]] | None = None, title: str = "") -> list[dict]:
    """summary.csv, results.md and average_vs_ratio.png in ``out_dir``; returns the summary rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    write_summary_csv(rows, out_dir / "summary.csv")
    text = [f"# {title}".rstrip(), "", "Scores (0-100).", "", results_table(rows, averages)]
    text += ["", "## Fidelity: % of answers identical to the full cache's", "", results_table(rows, averages, "fidelity")]
    costs = prefill_costs(records)
    if costs:
        text += ["", "## Prefill cost: (prefill + compression) / prefill, median over samples", "",
                 markdown_table(costs, [("press", "press"), ("prefill_cost", "× prefill"), ("samples", "samples")])]
    (out_dir / "results.md").write_text("\n".join(text) + "\n")
    name, tasks = widest_average(averages)
    ylabel = f"{name} average ({len(tasks)} tasks)" if tasks else "average score"
    plot_average_vs_ratio(rows, out_dir / "average_vs_ratio.png", tasks, title, ylabel)
    return rows
