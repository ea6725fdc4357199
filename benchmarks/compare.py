"""Several `sdrt bench --json` reports -> one Markdown table and one PNG chart (across machines, GPUs, backends).

    python benchmarks/compare.py benchmarks/results/bench_*.json --markdown table.md --png chart.png

The table has one row per contender per report: model, size, steps, end-to-end and per-stage medians, cold
start, peak memory, and the time ratio against that report's baseline. The chart draws each row's per-stage
medians as stacked bars of one generation's time (UNet steps multiplied out), one panel per setting so that a
64x64 demo and a 512x512 SD 1.5 each get their own time axis. Needs matplotlib (the `bench` or `dev` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STAGES = ("text_encoder", "text_encoder_2", "vae_encoder", "unet_step", "vae_decoder", "overhead")


def load(paths: list[Path]) -> list[dict]:
    reports = []
    for p in paths:
        try:
            report = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"compare.py: error: cannot read {p}: {e}")
        if report.get("benchmark") != "sdrt-bench":
            raise SystemExit(f"compare.py: error: {p} is not an `sdrt bench --json` report")
        reports.append(report)
    return reports


def _machine(report: dict) -> str:
    m = report["machine"]
    return m["gpu"]["name"] if m.get("gpu") else f"{m['cpu_model']} ({m['cpu_count']} cores)"


def rows(reports: list[dict]) -> list[dict]:
    out = []
    for report in reports:
        s = report["settings"]
        ratios = {name.split(" / ")[0]: r for name, r in report.get("ratios", {}).items()}
        for r in report["results"]:
            unet_calls = r["unet_calls"]
            out.append({
                "label": f"{s['model']} {s['width']}x{s['height']} {r['name']}",
                "machine": _machine(report), "model": s["model"], "size": f"{s['width']}x{s['height']}",
                "steps": f"{s['steps']} {s['scheduler']}", "contender": r["name"],
                "end_to_end": r["end_to_end"]["median_s"],
                "stages": {k: v["median_s"] for k, v in r["stages"].items()},
                "stage_totals": {k: v["median_s"] * (unet_calls if k == "unet_step" else 1)
                                 for k, v in r["stages"].items()},
                "cold_start": r["cold_start_s"], "rss_gib": r["peak_memory"]["host_rss_bytes"] / 2**30,
                "gpu_gib": (r["peak_memory"]["gpu_bytes"] or 0) / 2**30 if r["peak_memory"]["gpu_bytes"] else None,
                "ratio": ratios.get(r["name"], {}).get("end_to_end"),
            })
    return out


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def markdown(table: list[dict]) -> str:
    stages = [k for k in STAGES if any(k in r["stages"] for r in table)]
    head = ["machine", "model", "size", "steps", "contender", "end to end", *stages, "cold start", "peak RSS",
            "peak GPU", "time vs baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["machine"], r["model"], r["size"], r["steps"], r["contender"], _s(r["end_to_end"]),
                 *[_s(r["stages"].get(k)) for k in stages], _s(r["cold_start"]), f"{r['rss_gib']:.2f} GiB",
                 f"{r['gpu_gib']:.2f} GiB" if r["gpu_gib"] is not None else "-",
                 f"{r['ratio']:.2f}x" if r["ratio"] is not None else "baseline"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(table: list[dict], path: Path) -> None:
    """One panel per benchmark setting (model, size, steps, machine), each with its own linear time axis: a
    stacked bar per contender, one segment per stage of a generation (the UNet's steps multiplied out)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels: dict[str, list[dict]] = {}
    for r in table:
        panels.setdefault(f"{r['model']} {r['size']}, {r['steps']} steps, {r['machine']}", []).append(r)
    colours = dict(zip(STAGES, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(9, 0.6 + sum(0.9 + 0.45 * len(p) for p in panels.values())))
    for ax, (title, rs) in zip(axes[:, 0], panels.items()):
        left = [0.0] * len(rs)
        for stage in STAGES:
            widths = [r["stage_totals"].get(stage, 0.0) for r in rs]
            if any(widths):
                ax.barh(range(len(rs)), widths, left=left, color=colours[stage],
                        label=stage.replace("unet_step", "unet (all steps)"))
                left = [a + b for a, b in zip(left, widths)]
        ax.set_yticks(range(len(rs)), [r["contender"] for r in rs], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("seconds per generation (median)", fontsize=8)
    handles = {h.get_label(): h for ax in axes[:, 0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="upper right")
    fig.suptitle("sdrt bench: where a generation's time goes", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", type=Path, help="`sdrt bench --json` files")
    p.add_argument("--markdown", type=Path, default=None, help="write the table here (default: stdout only)")
    p.add_argument("--png", type=Path, default=None, help="write the chart here")
    args = p.parse_args(argv)
    table = rows(load(args.reports))
    text = markdown(table)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    if args.png:
        chart(table, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
