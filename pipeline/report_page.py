"""The report's page: charts drawn with matplotlib and embedded as PNG, the HTML around them, and the
headless-Chromium screenshot of it."""

from __future__ import annotations

import base64
import html
import io
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import numpy as np

from pipeline.bench.report import pyplot

CHROMIUMS = ("chromium", "chromium-browser")


def _chart(draw, title: str, height: float = 3.4) -> str:
    """A matplotlib chart as an embedded PNG `<img>`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, height), dpi=100)
    draw(ax)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _histogram(ax, hist: dict, xlabel: str) -> None:
    edges = np.asarray(hist["edges"])
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="tab:blue", edgecolor="white")
    ax.set(xlabel=xlabel, ylabel="rows")


def _classes(ax, classes: list, column: str) -> None:
    names = [(str(c) if len(str(c)) <= 28 else str(c)[:27] + "…") if isinstance(c, str) else f"#{c}" for c, _ in classes]
    ax.barh(range(len(names)), [n for _, n in classes], color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel(f"rows ({column}[0])")


def _rates(ax, ranks: list) -> None:
    start = min(s["start"] for s in ranks)
    unit, name = (3600, "hours") if max(max(s["times"]) for s in ranks) - start > 3 * 3600 else (60, "minutes")
    for s in ranks:
        ax.plot((np.asarray(s["times"]) - start) / unit, s["rates"], marker="o" if len(s["times"]) < 20 else None,
                markersize=4, label=f"rank {s['rank']}" + (" (running)" if s["running"] else ""))
    ax.set(xlabel=f"{name} since the first rank started", ylabel="images/s", ylim=(0, None))
    if len(ranks) <= 10:
        ax.legend(fontsize=8)


def _model_sections(m: dict, ok_rows: int) -> list[tuple[str, str]]:
    """One model's charts (its name before each title when the run has several)."""
    name, p = (f"{m['name']}: ", f"{m['name']}_") if m["name"] else ("", "")
    sections = []
    if m["top_classes"]:
        height = 1.2 + 0.22 * len(m["top_classes"])
        sections.append((f"{name}Top predicted classes",
                         _chart(lambda ax: _classes(ax, m["top_classes"], m["class_column"]),
                                f"{sum(n for _, n in m['top_classes']):,} of {ok_rows:,} ok rows", max(height, 3.4))))
    for key, title, xlabel in (("top1_prob", "Top-1 probability", f"{p}topk_prob[0]"),
                               ("embedding_norm", "Embedding L2 norm", f"‖{p}embedding‖₂"), ("score", "Score", f"{p}score")):
        if m[key]:
            sections.append((name + title, _chart(lambda ax, k=key, x=xlabel: _histogram(ax, m[k], x),
                                                  f"{m[key]['values']:,} ok rows")))
    return sections


def render_html(r: dict) -> str:
    """The page: who ran what and how far it got, two tables, then the charts in a grid."""
    e = html.escape
    ident = r["identity"]
    if ident.get("models"):
        fields = {"models": ", ".join(f"{name} ({m['model']})" for name, m in ident["models"].items()),
                  "precision": ident["precision"], "batch size": ident["batch_size"], "version": ident["version"],
                  "rows": f"{r['rows']:,}", "shards": r["shards"]}
    else:
        fields = {"model": ident["model"], "source": ident["source"], "weights": ident["weights"],
                  "precision": ident["precision"], "batch size": ident["batch_size"],
                  "outputs": ", ".join(ident["outputs"] or []), "version": ident["version"],
                  "rows": f"{r['rows']:,}", "shards": r["shards"]}
    total = max(r["rows"], 1)
    status_rows = "".join(f"<tr><td>{e(k)}</td><td class=n>{v:,}</td><td class=n>{v / total:.2%}</td></tr>"
                          for k, v in r["status_counts"].items())
    error_rows = "".join(f"<tr><td class=nw>{e(s)}</td><td class=n>{n:,}</td><td class=kinds>"
                         f"{', '.join(f'<span class=nw>{e(k)} {v}</span>' for k, v in sorted(kinds.items(), key=lambda x: -x[1]))}"
                         "</td></tr>" for s, n, kinds in r["shard_errors"]) or "<tr><td colspan=3>no error rows</td></tr>"
    sections = [("Rows by status", f"<table><tr><th>status</th><th class=n>rows</th><th class=n>share</th></tr>"
                                   f"{status_rows}</table>"),
                ("Shards with the most error rows", "<table><tr><th>shard</th><th class=n>errors</th><th>by kind</th>"
                                                    f"</tr>{error_rows}</table>")]
    if r["model_stats"]:
        stat_rows = "".join(f"<tr><td>{e(s['model'])}</td><td class=n>{s['min_micro_batch']}</td>"
                            f"<td class=n>{s['oom_events']}</td><td>{'written' if s['written'] else 'run for a head'}</td></tr>"
                            for s in r["model_stats"])
        sections.append(("Models", "<table><tr><th>model</th><th class=n>smallest micro-batch</th><th class=n>OOM events"
                                   f"</th><th>this run</th></tr>{stat_rows}</table>"))
    if r.get("engine_stats"):
        sections.append(("Engines", _engine_table(r["engine_stats"])))
    for m in r["models"]:
        sections += _model_sections(m, r["status_counts"].get("ok", 0))
    sections.append(("Images/s per rank", _chart(lambda ax: _rates(ax, r["ranks"]), "between metrics refreshes")
                     if r["ranks"] else "<p>No rank metrics (<code>_metrics/rank-*.json</code>) yet.</p>"))
    state = r["state"].replace(" ", "-")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>shardscore report: {e(str(ident['model'] or '+'.join(ident.get('models') or [])))}</title>
<style>{CSS}</style></head><body>
<h1>shardscore report</h1><p class=path>{e(os.path.abspath(r['output_dir']))}</p>
<p><span class="state {state}">{e(r['state_detail'])}</span>
<span class=when>generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}</span></p>
<table class=identity><tr>{''.join(f'<th>{e(k)}</th>' for k in fields)}</tr>
<tr>{''.join(f'<td>{e(str(v))}</td>' for v in fields.values())}</tr></table>
<div class=grid>{''.join(f'<section><h2>{e(t)}</h2>{body}</section>' for t, body in sections)}</div>
</body></html>
"""


CSS = """body{font:15px/1.45 "DejaVu Sans",Arial,sans-serif;color:#222;background:#fff;margin:24px;max-width:1152px}
h1{font-size:24px;margin:0}h2{font-size:16px;margin:0 0 8px}.path{font-family:monospace;color:#555;margin:4px 0 10px}
.state{padding:4px 10px;border-radius:4px;font-weight:bold}.complete{background:#dcf2dc}
.in-progress{background:#fff0c2}.incomplete{background:#f9d6d5}.when{color:#777;margin-left:12px;font-size:13px}
table{border-collapse:collapse;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #e4e4e4;text-align:left}
th{color:#555;font-weight:normal;font-size:13px}.n{text-align:right;font-variant-numeric:tabular-nums}
.identity{margin-top:14px}.identity td{font-weight:bold}
.nw{white-space:nowrap}.kinds{font-size:12px;color:#444}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px;margin-top:18px;align-items:start}
section{border:1px solid #ddd;border-radius:6px;padding:12px;min-width:0}img{max-width:100%;display:block}"""


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUMS) if path), None)


def screenshot(chromium: str, page: str, png: str, width: int = 1200, height: int = 8000) -> None:
    """Render `page` with headless Chromium to `png`, `width` wide, cut below the content. The network
    flags keep Chromium from dialling out (refused connections on a closed network otherwise stall it)."""
    from PIL import Image, ImageChops

    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    if os.path.exists(png):
        os.remove(png)  # so a Chromium that writes nothing is not mistaken for one that did
    with tempfile.TemporaryDirectory(prefix="shardscore-chromium-") as profile:
        done = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={os.path.abspath(png)}",
             pathlib.Path(page).resolve().as_uri()], capture_output=True, text=True, timeout=180)
    if done.returncode or not os.path.exists(png):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{chromium} could not render {page} (exit {done.returncode}): {last}")
    with Image.open(png) as image:
        image = image.convert("RGB")
    box = ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox()
    image.crop((0, 0, image.width, min(image.height, (box[3] if box else 0) + 24))).save(png)


def _engine_table(stats: list[dict]) -> str:
    rows = []
    for s in stats:
        scored = (f"eager (gate failed) on {s['eager_ranks']} of {s['ranks']} ranks" if s["eager_ranks"]
                  else s["backend"])
        gate = " ".join(f"{k}={v}" for k, v in s["gate"].items())
        cells = "".join(f"<td>{html.escape(str(v))}</td>" for v in (s["model"], s["backend"], s["precision"], scored, gate))
        rows.append(f"<tr>{cells}<td class=n>{s['built']} / {s['hits']}</td></tr>")
    return ("<table><tr><th>model</th><th>back-end</th><th>precision</th><th>scored with</th>"
            "<th>gate against eager (weakest rank)</th><th class=n>built / cache hits</th></tr>"
            f"{''.join(rows)}</table>")
