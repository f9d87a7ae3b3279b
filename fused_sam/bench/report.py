"""Environment description, the printed tables, results.json and the PNG plot."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Dict, List, Optional

import torch


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return None
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:
        return None


def environment(device: torch.device) -> Dict[str, object]:
    import fused_sam

    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fused_sam": fused_sam.__version__,
        "git_commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env


def _fmt(v, spec: str, none: str = "-") -> str:
    if v is None:
        return none
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def micro_table(result: dict, device_type: str) -> str:
    launches = "kernels" if device_type == "cuda" else "aten ops"
    header = ["set", "opt", "dtype", "method", "median ms", "IQR ms", "min ms", "GB/s", "% copy",
              launches, "extra MB", "x classic", "x torch-native", "verified"]
    lines = []
    for r in result["rows"]:
        if r.get("error"):
            lines.append([r["set"], r["optimizer"], r["dtype"], r["method"], "ERROR: " + r["error"][:60]])
            continue
        count = r.get("kernels") if device_type == "cuda" else r.get("aten_ops")
        extra = None if r.get("extra_bytes") is None else r["extra_bytes"] / 2**20
        lines.append([
            r["set"], r["optimizer"], r["dtype"], r["method"], _fmt(r["median_ms"], ".3f"), _fmt(r["iqr_ms"], ".3f"),
            _fmt(r["min_ms"], ".3f"), _fmt(r["gbps"], ".1f"), _fmt(r.get("pct_of_copy"), ".0f"), _fmt(count, "d"),
            _fmt(extra, ".1f"), _fmt(r.get("speedup_vs_classic"), ".2f"), _fmt(r.get("speedup_vs_torch_native"), ".2f"),
            "yes" if r.get("verified") else "NO",
        ])
    copy = result["copy"]
    title = (f"SAM optimizer step (first_step + second_step), copy bandwidth {copy['gbps']:.1f} GB/s "
             f"({copy['bytes'] / 2**20:.0f} MiB copy)")
    return title + "\n" + _table(header, lines)


def e2e_table(rows: List[dict]) -> str:
    header = ["model", "params", "batch", "method", "runs", "median ms", "IQR ms", "steps/s", "x plain"]
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append([r["model"], "-", r["batch"], r["method"], "ERROR: " + r["error"][:60]])
            continue
        lines.append([r["model"], f"{r['params'] / 1e6:.2f}M", r["batch"], r["method"], r.get("info", ""),
                      _fmt(r["median_ms"], ".2f"), _fmt(r["iqr_ms"], ".2f"), _fmt(r["steps_per_s"], ".1f"),
                      _fmt(r["x_plain"], ".2f")])
    return "End-to-end training step (forward + backward + optimizer)\n" + _table(header, lines)


def _table(header: List[str], lines: List[list]) -> str:
    lines = [[str(c) for c in line] for line in lines]
    widths = [len(h) for h in header]
    for line in lines:
        if len(line) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, line)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    for line in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    return "\n".join(out)


def markdown(payload: dict) -> str:
    """The results as Markdown tables (what docs/bench.md shows), from the results.json payload."""
    env, copy = payload["environment"], payload["copy_bandwidth"]
    gpu = str(env.get("device", "")).startswith("cuda")
    out = [f"Measured on {env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
           f"triton {env.get('triton')}, CUDA {env.get('cuda')}, commit {env.get('git_commit')}; "
           f"copy bandwidth {copy['gbps']:.1f} GB/s; warmup {payload['config']['warmup']}, "
           f"repeats {payload['config']['repeats']}.", ""]
    count = "kernels" if gpu else "aten ops"
    out.append(f"| set | optimizer | dtype | method | median ms | IQR ms | GB/s | % copy | {count} | extra MB "
               "| x classic | x torch-native | verified |")
    out.append("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in payload["results"]:
        if r.get("error"):
            out.append(f"| {r['set']} | {r['optimizer']} | {r['dtype']} | {r['method']} | error: {r['error'][:80]} "
                       "| | | | | | | | no |")
            continue
        n = r.get("kernels") if gpu else r.get("aten_ops")
        extra = None if r.get("extra_bytes") is None else r["extra_bytes"] / 2**20
        cells = [r["set"], r["optimizer"], r["dtype"], r["method"], _fmt(r["median_ms"], ".3f"),
                 _fmt(r["iqr_ms"], ".3f"), _fmt(r["gbps"], ".1f"), _fmt(r.get("pct_of_copy"), ".0f"), _fmt(n, "d"),
                 _fmt(extra, ".1f"), _fmt(r.get("speedup_vs_classic"), ".2f"), _fmt(r.get("speedup_vs_torch_native"), ".2f"),
                 "yes" if r.get("verified") else "**no**"]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    if payload.get("e2e"):
        out += ["", "| model | params | batch | method | runs | median ms | steps/s | x plain |",
                "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
        for r in payload["e2e"]:
            if r.get("error"):
                out.append(f"| {r['model']} | | {r['batch']} | {r['method']} | error: {r['error'][:80]} | | | |")
                continue
            out.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['method']} | {r.get('info', '')} "
                       f"| {r['median_ms']:.2f} | {r['steps_per_s']:.1f} | {_fmt(r['x_plain'], '.2f')} |")
    return "\n".join(out) + "\n"


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


def plot(path: str, result: dict, env: dict) -> Optional[str]:
    """Median step time and % of copy bandwidth per method and parameter set; returns a message if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'fused_sam[plot]'): no plot written"
    rows = [r for r in result["rows"] if not r.get("error")]
    if not rows:
        return "no successful rows: no plot written"
    combos = sorted({(r["optimizer"], r["dtype"]) for r in rows}, key=lambda c: (c[0] != "sgd", c[0], c[1] != "fp32", c[1]))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(2, len(combos), figsize=(4.8 * len(combos) + 1, 7.5), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for col, (opt, dtype) in enumerate(combos):
        for row_i, (key, label) in enumerate((("median_ms", "ms per SAM step (log)"), ("pct_of_copy", "% of copy bandwidth"))):
            ax = axes[row_i][col]
            for mi, m in enumerate(methods):
                xs, ys, errs = [], [], []
                for si, s in enumerate(sets):
                    r = next((r for r in rows if (r["set"], r["optimizer"], r["dtype"], r["method"]) == (s, opt, dtype, m)), None)
                    if r is None:
                        continue
                    xs.append(si + (mi - (len(methods) - 1) / 2) * width)
                    ys.append(r[key])
                    if key == "median_ms":
                        errs.append((r["median_ms"] - r["q1_ms"], r["q3_ms"] - r["median_ms"]))
                yerr = list(zip(*errs)) if errs else None
                ax.bar(xs, ys, width, label=m, yerr=yerr, capsize=2)
            ax.set_xticks(range(len(sets)))
            ax.set_xticklabels(sets, rotation=20, fontsize=8)
            ax.set_ylabel(label)
            if key == "median_ms":
                ax.set_yscale("log")
                ax.set_title(f"{opt} {dtype}")
            else:
                ax.axhline(100, color="gray", lw=0.8, ls="--")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"fused_sam bench on {env.get('device_name')} (torch {env.get('torch')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
