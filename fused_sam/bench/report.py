"""Environment description, the printed tables, results.json and the PNG plot."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Callable, Dict, List, Optional, Tuple

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


def machine_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15-minute load averages: how many processes were running or waiting for a core."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not available (Windows)
        return None


def environment(device: torch.device) -> Dict[str, object]:
    """The machine, versions, threads and the load average before the run."""
    import fused_sam

    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_available": machine_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_average(),
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


def flag_notes(rows: List[dict], label: Callable[[dict], str]) -> Tuple[List[str], List[str]]:
    """Per row, a short flag cell ("IMPOSSIBLE [1]", "noisy [2]" or ""), and the numbered footnotes that spell
    out each flagged row's reasons."""
    cells, notes = [], []
    for r in rows:
        reasons = r.get("flags") or []
        if not reasons:
            cells.append("")
            continue
        notes.append(f"[{len(notes) + 1}] {label(r)}: {'; '.join(reasons)}")
        word = "IMPOSSIBLE" if any(f.startswith("impossible") for f in reasons) else "noisy"
        cells.append(f"{word} [{len(notes)}]")
    return cells, notes


def _micro_label(r: dict) -> str:
    return f"{r['set']} {r['optimizer']} {r['dtype']} {r['method']}"


def _e2e_label(r: dict) -> str:
    return f"{r['model']} {r['method']}"


def micro_table(result: dict, device_type: str) -> str:
    launches = "kernels" if device_type == "cuda" else "aten ops"
    header = ["set", "opt", "dtype", "method", "median ms", "IQR ms", "min ms", "GB/s", "% copy",
              launches, "extra MB", "x classic", "x torch-native", "verified", "flags"]
    flag_cells, notes = flag_notes(result["rows"], _micro_label)
    lines = []
    for r, flag in zip(result["rows"], flag_cells):
        if r.get("error"):
            lines.append([r["set"], r["optimizer"], r["dtype"], r["method"], "ERROR: " + r["error"][:60]])
            continue
        count = r.get("kernels") if device_type == "cuda" else r.get("aten_ops")
        extra = None if r.get("extra_bytes") is None else r["extra_bytes"] / 2**20
        lines.append([
            r["set"], r["optimizer"], r["dtype"], r["method"], _fmt(r["median_ms"], ".3f"), _fmt(r["iqr_ms"], ".3f"),
            _fmt(r["min_ms"], ".3f"), _fmt(r["gbps"], ".1f"), _fmt(r.get("pct_of_copy"), ".0f"), _fmt(count, "d"),
            _fmt(extra, ".1f"), _fmt(r.get("speedup_vs_classic"), ".2f"), _fmt(r.get("speedup_vs_torch_native"), ".2f"),
            "yes" if r.get("verified") else "NO", flag,
        ])
    copy = result["copy"]
    spread = (f"{copy['gbps_min']:.1f}-{copy['gbps_max']:.1f} GB/s over the cases, each row against its own case's"
              if len(copy["cases"]) > 1 else "timed before, between the rounds of and after the case")
    title = (f"SAM optimizer step (first_step + second_step), median over rounds; memory bandwidth {copy['gbps']:.1f} "
             f"GB/s ({copy['bytes'] / 2**20:.0f} MiB {copy.get('stream', 'copy')}, {spread}); % copy is against it")
    return "\n".join([title, _table(header, lines)] + notes)


def e2e_table(rows: List[dict]) -> str:
    header = ["model", "params", "batch", "method", "runs", "median ms", "IQR ms", "steps/s", "x plain", "flags"]
    flag_cells, notes = flag_notes(rows, _e2e_label)
    lines = []
    for r, flag in zip(rows, flag_cells):
        if r.get("error"):
            lines.append([r["model"], "-", r["batch"], r["method"], "ERROR: " + r["error"][:60]])
            continue
        lines.append([r["model"], f"{r['params'] / 1e6:.2f}M", r["batch"], r["method"], r.get("info", ""),
                      _fmt(r["median_ms"], ".2f"), _fmt(r["iqr_ms"], ".2f"), _fmt(r["steps_per_s"], ".1f"),
                      _fmt(r["x_plain"], ".2f"), flag])
    return "\n".join(["End-to-end training step (forward + backward + optimizer), median over rounds",
                      _table(header, lines)] + notes)


def _table(header: List[str], lines: List[list]) -> str:
    lines = [[str(c) for c in line] for line in lines]
    widths = [len(h) for h in header]
    for line in lines:
        if len(line) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, line)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    for line in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    return "\n".join(out)


def markdown(payload: dict) -> str:
    """The results as Markdown tables (what docs/bench.md shows), from the results.json payload."""
    env, copy, config = payload["environment"], payload["copy_bandwidth"], payload["config"]
    gpu = str(env.get("device", "")).startswith("cuda")
    out = [f"Measured on {env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
           f"triton {env.get('triton')}, CUDA {env.get('cuda')}, commit {env.get('git_commit')}; "
           f"{env.get('torch_threads')} threads on {env.get('cores_available')} cores, load average "
           f"{_loads(env.get('load_average_before'))} before the run and {_loads(env.get('load_average_after'))} "
           f"after; memory bandwidth {copy['gbps']:.1f} GB/s ({copy.get('stream', 'copy')}, "
           f"{copy['gbps_min']:.1f}-{copy['gbps_max']:.1f}), what % copy divides by; "
           f"warmup {config['warmup']}, {config['rounds']} rounds of {config['repeats']} steps, methods interleaved; "
           f"flags: IQR/median > {config['noise_threshold']:g} or impossible.", ""]
    count = "kernels" if gpu else "aten ops"
    out.append(f"| set | optimizer | dtype | method | median ms | IQR ms | GB/s | % copy | {count} | extra MB "
               "| x classic | x torch-native | verified | flags |")
    out.append("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in payload["results"]:
        if r.get("error"):
            out.append(f"| {r['set']} | {r['optimizer']} | {r['dtype']} | {r['method']} | error: {r['error'][:80]} "
                       "| | | | | | | | no | |")
            continue
        n = r.get("kernels") if gpu else r.get("aten_ops")
        extra = None if r.get("extra_bytes") is None else r["extra_bytes"] / 2**20
        cells = [r["set"], r["optimizer"], r["dtype"], r["method"], _fmt(r["median_ms"], ".3f"),
                 _fmt(r["iqr_ms"], ".3f"), _fmt(r["gbps"], ".1f"), _fmt(r.get("pct_of_copy"), ".0f"), _fmt(n, "d"),
                 _fmt(extra, ".1f"), _fmt(r.get("speedup_vs_classic"), ".2f"), _fmt(r.get("speedup_vs_torch_native"), ".2f"),
                 "yes" if r.get("verified") else "**no**", "; ".join(r.get("flags") or [])]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    if payload.get("e2e"):
        out += ["", "| model | params | batch | method | runs | median ms | steps/s | x plain | flags |",
                "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- |"]
        for r in payload["e2e"]:
            if r.get("error"):
                out.append(f"| {r['model']} | | {r['batch']} | {r['method']} | error: {r['error'][:80]} | | | | |")
                continue
            out.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['method']} | {r.get('info', '')} "
                       f"| {r['median_ms']:.2f} | {r['steps_per_s']:.1f} | {_fmt(r['x_plain'], '.2f')} "
                       f"| {'; '.join(r.get('flags') or [])} |")
    return "\n".join(out) + "\n"


def _loads(loads: Optional[List[float]]) -> str:
    return "unknown" if not loads else "/".join(f"{x:.2f}" for x in loads)


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
