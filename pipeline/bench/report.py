"""What the benchmark modes print and draw: tables, JSON files and matplotlib plots."""

from __future__ import annotations

import json

from pipeline.errors import UserError


def write_json(data: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def pyplot():
    """matplotlib's pyplot on the file-only Agg back-end (no display on a compute node)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'shardscore[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(report: dict, path: str) -> None:
    """images/s against batch size (log2), one line per back-end × precision; the recommendation starred,
    OOM crossed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    sizes = sorted({p["batch"] for e in report["series"] for p in e["points"]})
    for entry in report["series"]:
        ok = [p for p in entry["points"] if not p["oom"]]
        line, = ax.plot([p["batch"] for p in ok], [p["images_per_sec"] for p in ok], marker="o",
                        label=f"{entry['backend']} {entry['precision']}")
        chosen = next((p for p in ok if p["batch"] == entry["recommended"]), None)
        if chosen:
            ax.plot(chosen["batch"], chosen["images_per_sec"], marker="*", markersize=16, color=line.get_color(),
                    markeredgecolor="black", linestyle="none")
            ax.annotate(f"recommended {chosen['batch']}", (chosen["batch"], chosen["images_per_sec"]),
                        textcoords="offset points", xytext=(6, -14), fontsize=8)
        for p in entry["points"]:
            if p["oom"]:
                ax.plot(p["batch"], 0, marker="x", markersize=10, color=line.get_color(), linestyle="none")
                ax.annotate("OOM", (p["batch"], 0), textcoords="offset points", xytext=(-10, 6), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s (model alone)")
    ax.set_title(f"{report['model']} {report['image_size']}px, {report['device']}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title="back-end, precision")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_e2e_table(report: dict) -> str:
    lines = [f"{'variant':<12} | {'images/s':>9} | {'whole run':>9} | {'x score':>7} | per round"]
    for name, v in report["variants"].items():
        ratio = f"{v['ratio_to_score']:.2f}" if "ratio_to_score" in v else "-"
        rounds = " ".join(f"{r['sustained_images_per_sec']:.1f}" for r in v["rounds"])
        lines.append(f"{name:<12} | {v['images_per_sec']:>9.1f} | {v['whole_run_images_per_sec']:>9.1f} | "
                     f"{ratio:>7} | {rounds}")
    bound = report["bound"]
    if bound:
        ratio = f"{bound['ratio_to_score']:.2f}" if "ratio_to_score" in bound else "-"
        lines.append(f"{'bound':<12} | {bound['images_per_sec']:>9.1f} | {'':>9} | {ratio:>7} | {bound['rule']}")
    if report["score_to_bound"] is not None:
        lines.append(f"jobs.score ({report['reference']}) reaches {report['score_to_bound']:.0%} of the "
                     f"decode+model bound")
    return "\n".join(lines)


def plot_e2e(report: dict, path: str) -> None:
    """One bar per variant (images/s, median; whiskers span the rounds), the bound as a dashed line."""
    plt = pyplot()
    names = list(report["variants"])
    values = [report["variants"][n]["images_per_sec"] for n in names]
    lows = [v - min(r["sustained_images_per_sec"] for r in report["variants"][n]["rounds"]) for n, v in zip(names, values)]
    highs = [max(r["sustained_images_per_sec"] for r in report["variants"][n]["rounds"]) - v for n, v in zip(names, values)]
    colors = ["tab:blue" if n.startswith("score_") else "tab:gray" if n.endswith("_only") else "tab:orange"
              for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(names) + 1.6), dpi=100)
    ax.barh(names, values, xerr=[lows, highs], color=colors, capsize=3)
    for i, (v, high) in enumerate(zip(values, highs)):
        ax.annotate(f"{v:.1f}", (v + high, i), textcoords="offset points", xytext=(6, -3), fontsize=8)
    if report["bound"]:
        ax.axvline(report["bound"]["images_per_sec"], color="black", linestyle="--",
                   label=f"bound {report['bound']['images_per_sec']:.1f} = {report['bound']['rule']}")
        ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images/s (median over rounds)")
    ax.set_title(f"{report['model']} {report['image_size']}px {report['precision']} batch {report['batch_size']}, "
                 f"{report['images']} images, {report['device']}", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_overhead_table(report: dict) -> str:
    lines = [f"{'variant':<12} | {'rows/s':>8} | per round"]
    for name, v in report["variants"].items():
        rounds = " ".join(f"{r['rows_per_sec']:.0f}" for r in v["rounds"])
        lines.append(f"{name:<12} | {v['rows_per_sec']:>8} | {rounds}")
    if "embedding_to_topk" in report:
        lines.append(f"outputs=[embedding] (768 wide) ÷ outputs=[topk], decoder=dali, paired per round: "
                     f"{report['embedding_to_topk']:.2f}")
    for decoder, c in report["shard_cost"].items():
        lines.append(f"shard cost decoder={decoder}: {c['rows']} rows as {c['few']} shards {c['wall_seconds_few']:.2f} s, "
                     f"as {c['many']} shards {c['wall_seconds_many']:.2f} s (medians) → {c['ms_per_extra_shard']:.2f} ms "
                     f"per extra shard in whole-process wall time (rounds: "
                     f"{' '.join(f'{v:.2f}' for v in c['ms_per_extra_shard_per_round'])}); "
                     f"{c['job_ms_per_extra_shard']:.2f} ms in the job's own time (rounds: "
                     f"{' '.join(f'{v:.2f}' for v in c['job_ms_per_extra_shard_per_round'])}); "
                     f"peak RSS {c['peak_rss_mb_few']} / {c['peak_rss_mb_many']} MB")
    storage = report.get("storage_cost")
    for decoder in [d for d in ("dali", "torch") if storage and d in storage]:
        for place, what in (("s3", "indexed first"), ("s3_cached", "index cached"), ("s3_staged", "staged, data.stage_dir")):
            if place not in storage[decoder]:
                continue
            c = storage[decoder][place]
            lines.append(f"storage decoder={decoder}: {storage['shards']} shards from a local S3 server ({what}) ÷ from "
                         f"local disk (paired per round): job's own time {c['job_seconds_ratio']:.2f}×, whole process "
                         f"{c['wall_seconds_ratio']:.2f}×, sustained rows/s {c['rows_per_sec_ratio']:.2f}× slower")
    lines.append(f"cpu flags: {report['cpu_flags']}")
    return "\n".join(lines)
