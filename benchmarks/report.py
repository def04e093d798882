"""Benchmark JSON -> a markdown table and a PNG plot of latency vs N per backend.

Reads any mix of pytest-benchmark JSON (``--benchmark-json``; the suites in this folder tag their runs with
``extra_info["suite"]``) and ``momkd bench --json`` files::

    python benchmarks/report.py latency.json head.json bench.json unfused-head=bench2.json --md report.md --png x.png

An input given as ``NAME=PATH`` has " [NAME]" added to its latency series (to tell apart two runs of the same
backend, e.g. with the fused head switched off).

Sections: latency vs N (``momkd bench`` records and the ``latency`` suite; one series per backend, device,
precision and pack), the fused vs unfused memory head (``head`` suite, with the speed-up), the ONNX Runtime CPU
roofline check (``roofline`` suite), and every other benchmark by name. The PNG has one panel for latency vs N
and, when head results are present, one for the head. Needs matplotlib only for ``--png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


class ReportError(Exception):
    """A problem with the inputs or outputs, reported as one line."""


def load(inputs: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(momkd bench records, pytest-benchmark entries) from the given files (``PATH`` or ``NAME=PATH``); entries
    of a named file carry ``"label": NAME``."""
    records, benches = [], []
    for item in inputs:
        label, _, rest = item.partition("=")
        label, path = (label, Path(rest)) if rest else ("", Path(item))
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise ReportError(f"{path}: cannot be read ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: not JSON (line {e.lineno}: {e.msg})") from None
        if isinstance(data, list) and all(isinstance(r, dict) and "backend" in r for r in data):
            records += [{**r, "label": label} for r in data]
        elif isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
            benches += [{**b, "label": label} for b in data["benchmarks"]]
        else:
            raise ReportError(f"{path}: neither pytest-benchmark JSON nor `momkd bench --json` records")
    return records, benches


def latency_points(records: list[dict[str, Any]], benches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (series, N): ``{"series", "n", "median_ms", "gflop_per_s", "dprob", "source"}``."""
    points = []
    for r in records:
        if r.get("status") != "ok":
            continue
        pack = f" x{r['slides_per_pack']}" if r.get("slides_per_pack", 1) != 1 else ""
        label = f" [{r['label']}]" if r.get("label") else ""
        points.append({"series": f"{r['backend']} {r['device']} {r['precision']}{pack}{label}", "n": r["n_patches"],
                       "median_ms": r["median_ms"], "gflop_per_s": r.get("gflop_per_s"),
                       "dprob": r.get("max_abs_dprob"), "source": "momkd bench"})
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("suite") != "latency":
            continue
        resident = "" if info.get("transfers", True) else " resident"
        label = f" [{b['label']}]" if b.get("label") else ""
        points.append({"series": f"{info['backend']} {info['device']} {info['precision']}{resident}{label}",
                       "n": info["n_patches"], "median_ms": b["stats"]["median"] * 1e3,
                       "gflop_per_s": info.get("gflop_per_s"), "dprob": None, "source": "pytest-benchmark"})
    return sorted(points, key=lambda p: (p["series"], p["n"]))


def head_rows(benches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fused vs unfused head per (preset, precision, device, N), device time where measured."""
    table: dict[tuple, dict[str, Any]] = defaultdict(dict)
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("suite") != "head":
            continue
        ms = info.get("device_ms", b["stats"]["median"] * 1e3)
        key = (info["preset"], info["precision"], info["device"], info["n_patches"])
        name = info["impl"] + (f" {info['input_precision']}" if info.get("input_precision") else "")
        if info.get("interpreter"):
            name += " (interpreter)"
        table[key][name] = ms
    rows = []
    for (preset, precision, device, n), impls in sorted(table.items()):
        unfused = impls.get("unfused")
        fused = {k: v for k, v in impls.items() if k.startswith("fused") and "interpreter" not in k}
        best = min(fused.values()) if fused else None
        rows.append({"preset": preset, "precision": precision, "device": device, "n": n, "impls": impls,
                     "speedup": unfused / best if unfused and best else None})
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(records: list[dict[str, Any]], benches: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    points = latency_points(records, benches)
    if points:
        lines += ["## Latency vs N", "", "| series | N | median ms | GFLOP/s | max abs dp | source |",
                  "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {p['series']} | {p['n']} | {_fmt(p['median_ms'], '.2f')} | {_fmt(p['gflop_per_s'], '.1f')} | "
                  f"{_fmt(p['dprob'], '.1e')} | {p['source']} |" for p in points]
        lines.append("")
    heads = head_rows(benches)
    if heads:
        lines += ["## Memory head: fused vs unfused (ms per slide)", "",
                  "| preset | precision | device | N | times (ms) | speed-up (unfused / best fused) |",
                  "|---|---|---|---:|---|---:|"]
        for h in heads:
            times = ", ".join(f"{k} {v:.3f}" for k, v in sorted(h["impls"].items()))
            lines.append(f"| {h['preset']} | {h['precision']} | {h['device']} | {h['n']} | {times} | "
                         f"{_fmt(h['speedup'], '.2f')} |")
        lines.append("")
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("suite") == "roofline":
            lines += ["## ONNX Runtime CPU vs fp32 matmul roofline", "",
                      f"N = {info['n_patches']}, D_in {info['feature_dim']}: {info['median_ms']:.0f} ms, "
                      f"{info['gflop']:.1f} GFLOP -> {info['achieved_gflop_per_s']:.1f} GFLOP/s = "
                      f"**{100 * info['roofline_fraction']:.0f}%** of {info['roofline_gflop_per_s']:.1f} GFLOP/s "
                      f"(engines {info['roofline_engines']}); matrix products {info['matrix_products_ms']} of "
                      f"{info['profiled_ms']} profiled ms; top ops {info['top_ops_ms']}", ""]
            if "products_only_fraction" in info:  # recorded since the bound decomposition was added
                lines += [f"With every non-product node free: {100 * info['products_only_fraction']:.0f}%; "
                          f"largest product {info['largest_product']}; per-edge (W+1) nodes "
                          f"{info['neighbourhood_ms']} ms (if they took no time: "
                          f"{100 * info['without_neighbourhood_fraction']:.0f}%)", ""]
    configs = [b["extra_info"] for b in benches if b.get("extra_info", {}).get("suite") == "head_config"]
    if configs:
        lines += ["## Fused head launch configurations (fp32)", "", "| preset | N | block_n | num_warps | ms |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {c['preset']} | {c['n_patches']} | {c['block_n']} | {c['num_warps']} | {c['device_ms']:.3f} |"
                  for c in sorted(configs, key=lambda c: (c["preset"], c["device_ms"]))]
        lines.append("")
    others = [b for b in benches
              if b.get("extra_info", {}).get("suite") not in ("latency", "head", "roofline", "head_config")]
    if others:
        lines += ["## Other benchmarks", "", "| benchmark | median ms | rounds |", "|---|---:|---:|"]
        lines += [f"| {b['fullname'] if 'fullname' in b else b['name']} | {b['stats']['median'] * 1e3:.1f} | "
                  f"{b['stats']['rounds']} |" for b in others]
        lines.append("")
    if not lines:
        raise ReportError("no benchmark results in the given files")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], benches: list[dict[str, Any]], path: Path) -> None:
    """Latency vs N per series (log-log); a second panel for the head when present."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("--png needs matplotlib (pip install momkd[plot])") from None
    points = latency_points(records, benches)
    heads = head_rows(benches)
    panels = [p for p in (points, heads) if p]
    if not panels:
        raise ReportError("nothing to plot: no latency or head results")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    ax_index = 0
    if points:
        ax = axes[0][ax_index]
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        sources = {p["source"] for p in points}
        for p in points:
            label = p["series"] + (f" ({p['source']})" if len(sources) > 1 else "")
            series[label].append((p["n"], p["median_ms"]))
        for name, values in sorted(series.items()):
            xs, ys = zip(*sorted(values))
            ax.plot(xs, ys, marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="patches per slide (N)", ylabel="median ms per call",
               title="model latency vs N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax_index += 1
    if heads:
        ax = axes[0][ax_index]
        series = defaultdict(list)
        for h in heads:
            for impl, ms in h["impls"].items():
                if "interpreter" not in impl:  # a correctness path: its times mean nothing
                    series[f"{impl} {h['preset']} {h['precision']} {h['device']}"].append((h["n"], ms))
        for name, values in sorted(series.items()):
            xs, ys = zip(*sorted(values))
            ax.plot(xs, ys, marker="o", label=name, linestyle="--" if name.startswith("unfused") else "-")
        ax.set(xscale="log", yscale="log", xlabel="patches (N)", ylabel="ms", title="memory head: fused vs unfused")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise ReportError(f"{path}: cannot be written ({e.strerror or e})") from None
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pytest-benchmark / momkd bench JSON -> markdown table + PNG plot")
    parser.add_argument("inputs", nargs="+", help="JSON files (pytest-benchmark or momkd bench), PATH or NAME=PATH")
    parser.add_argument("--md", type=Path, help="write the markdown here (default: print it)")
    parser.add_argument("--png", type=Path, help="write the latency plot here")
    args = parser.parse_args(argv)
    try:
        records, benches = load(args.inputs)
        text = markdown(records, benches)
        if args.md:
            try:
                args.md.write_text(text + "\n")
            except OSError as e:
                raise ReportError(f"{args.md}: cannot be written ({e.strerror or e})") from None
        else:
            print(text)
        if args.png:
            plot(records, benches, args.png)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
