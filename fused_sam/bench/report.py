"""Environment description, the printed tables, results.json and the PNG plot."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import textwrap
from typing import Callable, Dict, List, Optional

import torch

from .measure import NOISE_THRESHOLD

TABLE_WIDTH = 100  # what the printed tables and their notes fit in


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    """The commit of the git checkout this package runs from; None when installed (also into a virtual
    environment inside a checkout, where git would answer for the checkout, not for these files)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", os.path.basename(__file__)], cwd=here,
                                 capture_output=True, text=True, timeout=5)
        if tracked.returncode != 0:
            return None
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
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
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


def _num(v: float) -> str:
    """A time or ratio to three significant digits or so, without exponents."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def ratio(num: Optional[dict], den: Optional[dict], threshold: float) -> Optional[dict]:
    """num's time over den's. When either was noisy (IQR / median over rounds above ``threshold``), the ratio
    is not one number: {'low', 'high'} then bound it by the quartiles (num's first over den's third, num's
    third over den's first), and its text is that range. None if either row is missing or failed."""
    if not num or not den or num.get("error") or den.get("error") or num.get("median_ms") is None \
            or den.get("median_ms") is None:
        return None
    out = {"value": num["median_ms"] / den["median_ms"], "noisy": max(num["spread"], den["spread"]) > threshold}
    if out["noisy"]:
        out["low"] = num["q1_ms"] / den["q3_ms"] if den["q3_ms"] > 0 else math.inf
        out["high"] = num["q3_ms"] / den["q1_ms"] if den["q1_ms"] > 0 else math.inf
        out["text"] = f"{_num(out['low'])}-{_num(out['high'])}x"
    else:
        out["text"] = f"{_num(out['value'])}x"
    return out


def flag_notes(rows: List[dict], label: Callable[[dict], str], notes: Optional[List[str]] = None):
    """Per row, the numbers of its footnotes ("[1]", or "" when it has no flag), and the footnotes, which spell
    out each flagged row's reasons (appended to ``notes`` when given)."""
    cells = []
    notes = [] if notes is None else notes
    for r in rows:
        reasons = r.get("flags") or []
        if not reasons:
            cells.append("")
            continue
        notes.append(f"[{len(notes) + 1}] {label(r)}: {'; '.join(reasons)}")
        cells.append(f"[{len(notes)}]")
    return cells, notes


def _micro_label(r: dict) -> str:
    return f"{r['set']} {r['optimizer']} {r['dtype']} {r['method']}"


def _e2e_label(r: dict) -> str:
    return f"{r['model']} {r['method']}"


def headline_method(rows: List[dict], auto: Optional[str]) -> Optional[str]:
    """The fused method the headline shows: the one with the backend ``auto`` picks, else the first plain
    fused: method timed (no +GradScaler / +capturable / +master)."""
    names = [r["method"] for r in rows if r["method"].startswith("fused:") and "+" not in r["method"]]
    if auto and f"fused:{auto}" in names:
        return f"fused:{auto}"
    return names[0] if names else None


def _cases(rows: List[dict]) -> Dict[tuple, Dict[str, dict]]:
    out: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        out.setdefault((r["set"], r["optimizer"], r["dtype"]), {})[r["method"]] = r
    return out


def headline(result: dict, threshold: float) -> List[dict]:
    """Per (set, optimizer, dtype): the fused method's row, classic's and torch-native's, the two ratios
    (see ``ratio``) and whether every method of the case verified."""
    out = []
    for (set_name, optimizer, dtype), by_method in _cases(result["rows"]).items():
        fused = headline_method(list(by_method.values()), (result.get("auto") or {}).get(dtype))
        f, c, n = by_method.get(fused), by_method.get("classic"), by_method.get("torch-native")
        out.append(dict(set=set_name, optimizer=optimizer, dtype=dtype, fused_method=fused, fused=f, classic=c,
                        torch_native=n, x_classic=ratio(c, f, threshold), x_torch_native=ratio(n, f, threshold),
                        verified=all(r.get("verified") for r in by_method.values()),
                        failed=[m for m, r in by_method.items() if not r.get("verified")]))
    return out


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=TABLE_WIDTH, break_on_hyphens=False, subsequent_indent="  ")


def headline_table(result: dict, threshold: float, rounds: int) -> str:
    """The answer in a few rows (one per set and base optimizer): is the fused step faster here, by how much,
    how close to the memory bound, and is it right. Every method's row goes to results.md."""
    lines, notes = [], []
    dtypes = len({r["dtype"] for r in result["rows"]}) > 1
    heads = headline(result, threshold)
    fused_names = sorted({h["fused_method"] for h in heads if h["fused_method"]})
    picked = {f"fused:{b}" for b in (result.get("auto") or {}).values()}
    which = "the backend auto picks here" if fused_names and set(fused_names) <= picked else "not what auto picks"

    def ms(r):  # the time, with the number of its note when the row is flagged
        if not r:
            return "-"
        if r.get("error"):
            return "ERROR"
        (note,), _ = flag_notes([r], _micro_label, notes)
        return _num(r["median_ms"]) + note

    for h in heads:
        f = h["fused"]
        times = [ms(f), ms(h["classic"]), ms(h["torch_native"])]
        verified = "yes"
        if not h["verified"]:
            notes.append(f"[{len(notes) + 1}] {h['set']} {h['optimizer']} {h['dtype']}: NOT VERIFIED: "
                         f"{', '.join(h['failed'])} ended at other weights than classic SAM, or failed")
            verified = f"NO[{len(notes)}]"
        lines.append([h["set"], h["optimizer"] + (f" {h['dtype']}" if dtypes else "")] + times
                     + [(h["x_classic"] or {}).get("text", "-"), (h["x_torch_native"] or {}).get("text", "-"),
                        _fmt(f.get("pct_of_copy") if f and not f.get("error") else None, ".0f"), verified])
    header = ["set", "optimizer", "fused", "classic", "torch-native", "x classic", "x torch-native", "% bw",
              "verified"]
    copy = result["copy"]
    spread = f", {copy['gbps_min']:.1f}-{copy['gbps_max']:.1f} over the cases" if len(copy["cases"]) > 1 else ""
    intro = [
        f"SAM optimizer step (first_step + second_step), ms per step, median over {rounds} rounds",
        f"  fused: {' / '.join(fused_names) or '-'} ({which}); torch-native: the best stock-PyTorch SAM",
        "  x classic, x torch-native: how many times faster fused is; [n]: see note n below the table"
        + (" (a-b: a time was noisy; the ratio lies in that range)"
           if any((h[k] or {}).get("noisy") for h in heads for k in ("x_classic", "x_torch_native")) else ""),
        f"  % bw: fused's minimum bytes per step over the memory bandwidth, {copy['gbps']:.1f} GB/s{spread} "
        f"(% of memory bandwidth: {copy.get('reference', copy['stream'])})",
    ]
    table = _table(header, lines)
    return "\n".join([_wrap(t) for t in intro] + [table] + [_wrap(n) for n in notes])


def e2e_table(rows: List[dict], threshold: float = NOISE_THRESHOLD) -> str:
    header = ["model", "params", "batch", "method", "ms per step", "steps/s", "x plain", "notes"]
    flag_cells, notes = flag_notes(rows, _e2e_label)
    plain = {r["model"]: r for r in rows if r["method"] == "plain"}
    graphed = {r["model"]: r for r in rows if r["method"] == "plain-graphed"}
    lines = []
    for r, flag in zip(rows, flag_cells):
        if r.get("error"):
            lines.append([r["model"], "-", r["batch"], r["method"], "ERROR: " + r["error"][:60]])
            continue
        base = (graphed if r["method"].endswith("graphed") else plain).get(r["model"])
        x = ratio(r, base, threshold) if r is not base else None
        lines.append([r["model"], f"{r['params'] / 1e6:.2f}M", r["batch"], r["method"], _num(r["median_ms"]),
                      _fmt(r["steps_per_s"], ".1f"), x["text"] if x else "-", flag])
    intro = ("End-to-end training step (forward + backward + optimizer), median over rounds; x plain: the "
             "step's time over the plain step's (SAM's ideal: just over 2x)")
    return "\n".join([_wrap(intro), _table(header, lines)] + [_wrap(n) for n in notes])


def _table(header: List[str], lines: List[list]) -> str:
    lines = [[str(c) for c in line] for line in lines]
    if lines and all(len(line) == len(header) and not line[-1] for line in lines):  # no notes: no column
        header, lines = header[:-1], [line[:-1] for line in lines]
    widths = [len(h) for h in header]
    for line in lines:
        if len(line) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, line)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    for line in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    return "\n".join(out)


def provenance(env: dict) -> str:
    """The code that ran: the git commit in a checkout, else the installed package's version."""
    if env.get("git_commit"):
        return f"fused_sam commit {env['git_commit']}"
    return f"fused_sam {env.get('fused_sam')} (installed, not a git checkout)"


def markdown(payload: dict) -> str:
    """The results as Markdown tables (what docs/bench.md shows), from the results.json payload: every
    method's row."""
    env, copy, config = payload["environment"], payload["copy_bandwidth"], payload["config"]
    threshold = config["noise_threshold"]
    gpu = str(env.get("device", "")).startswith("cuda")
    out = [f"Measured on {env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
           f"triton {env.get('triton')}, CUDA {env.get('cuda')}, {provenance(env)}; "
           f"{env.get('torch_threads')} threads on {env.get('cores_available')} cores, load average "
           f"{_loads(env.get('load_average_before'))} before the run and {_loads(env.get('load_average_after'))} "
           f"after; % mem bw: a step's minimum bytes over the memory bandwidth "
           f"({copy.get('reference', copy.get('stream', 'copy'))}: {copy['gbps']:.1f} GB/s, "
           f"{copy['gbps_min']:.1f}-{copy['gbps_max']:.1f} over the cases); "
           f"warmup {config['warmup']}, {config['rounds']} rounds of {config['repeats']} steps, methods interleaved; "
           f"flags: IQR/median > {threshold:g} or impossible; a ratio a-b: a time in it was noisy, and the ratio "
           f"lies between its quartiles' ratios.", ""]
    count = "kernels" if gpu else "aten ops"
    out.append(f"| set | optimizer | dtype | method | median ms | IQR ms | GB/s | % mem bw | {count} | extra MB "
               "| x classic | x torch-native | verified | flags |")
    out.append("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    cases_ = _cases(payload["results"])
    for r in payload["results"]:
        if r.get("error"):
            out.append(f"| {r['set']} | {r['optimizer']} | {r['dtype']} | {r['method']} | error: {r['error'][:80]} "
                       "| | | | | | | | no | |")
            continue
        n = r.get("kernels") if gpu else r.get("aten_ops")
        extra = None if r.get("extra_bytes") is None else r["extra_bytes"] / 2**20
        same = cases_[(r["set"], r["optimizer"], r["dtype"])]
        x = [(ratio(same.get(other), r, threshold) or {}).get("text", "-") if other != r["method"] else "-"
             for other in ("classic", "torch-native")]
        cells = [r["set"], r["optimizer"], r["dtype"], r["method"], _fmt(r["median_ms"], ".3f"),
                 _fmt(r["iqr_ms"], ".3f"), _fmt(r["gbps"], ".1f"), _fmt(r.get("pct_of_copy"), ".0f"), _fmt(n, "d"),
                 _fmt(extra, ".1f"), x[0], x[1], "yes" if r.get("verified") else "**no**",
                 "; ".join(r.get("flags") or [])]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    if payload.get("e2e"):
        out += ["", "| model | params | batch | method | runs | median ms | IQR ms | steps/s | x plain | flags |",
                "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |"]
        plain = {(r["model"], r["method"]): r for r in payload["e2e"] if r["method"].startswith("plain")}
        for r in payload["e2e"]:
            if r.get("error"):
                out.append(f"| {r['model']} | | {r['batch']} | {r['method']} | error: {r['error'][:80]} | | | | | |")
                continue
            base = plain.get((r["model"], "plain-graphed" if r["method"].endswith("graphed") else "plain"))
            x = ratio(r, base, threshold) if base is not r else None
            out.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['method']} | {r.get('info', '')} "
                       f"| {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {r['steps_per_s']:.1f} | "
                       f"{x['text'] if x else '-'} | {'; '.join(r.get('flags') or [])} |")
    return "\n".join(out) + "\n"


def _loads(loads: Optional[List[float]]) -> str:
    return "unknown" if not loads else "/".join(f"{x:.2f}" for x in loads)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


# Bar colours per method family (colour-blind-safe hues); a variant of a fused method takes its backend's
# colour with a hatch, so every method stays distinct with the default three and with --full's eleven.
_COLOURS = {"classic": "#8c8c8c", "torch-native": "#e69f00", "fused:native": "#0072b2", "fused:torch": "#009e73",
            "fused:reference": "#cc79a7", "fused:triton": "#d55e00"}
_EXTRA_COLOURS = ["#56b4e9", "#f0e442", "#000000"]
_HATCHES = {"": "", "GradScaler": "///", "capturable": "...", "master": "xxx"}


def _style(method: str, index: int) -> dict:
    base, _, variant = method.partition("+")
    colour = _COLOURS.get(base, _EXTRA_COLOURS[index % len(_EXTRA_COLOURS)])
    return dict(color=colour, hatch=_HATCHES.get(variant, "---"), edgecolor="#222222", linewidth=0.6)


def plot(path: str, result: dict, env: dict, threshold: float = NOISE_THRESHOLD) -> Optional[str]:
    """A panel per base optimizer (and dtype): per parameter set, a bar per method (median ms per SAM step,
    log scale) with the quartiles over rounds as error bars, and the memory bound (the fewest bytes any of
    the case's methods must move, at the measured memory bandwidth) as a dashed line over the set's bars.
    Returns a message if the plot was skipped."""
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
    cases_ = _cases(rows)
    panel_width = max(4.0, 0.3 * len(sets) * len(methods) + 1.5)
    # side by side while the panels are narrow (the default three methods), one above the other when wide
    stacked = panel_width > 7
    shape = (len(combos), 1) if stacked else (1, len(combos))
    size = (panel_width + 2.8, 4.2 * len(combos)) if stacked else (panel_width * len(combos) + 2.8, 5.2)
    fig, grid = plt.subplots(*shape, figsize=size, squeeze=False)
    axes = list(grid.flat)
    width = 0.84 / len(methods)
    copy = result["copy"]
    bound_label = f"memory bound ({copy.get('reference', copy.get('stream'))})"
    for col, (opt, dtype) in enumerate(combos):
        ax = axes[col]
        for mi, m in enumerate(methods):
            xs, ys, low, high = [], [], [], []
            for si, s in enumerate(sets):
                r = cases_.get((s, opt, dtype), {}).get(m)
                if r is None or r.get("error"):
                    continue
                xs.append(si + (mi - (len(methods) - 1) / 2) * width)
                ys.append(r["median_ms"])
                low.append(r["median_ms"] - r["q1_ms"])
                high.append(r["q3_ms"] - r["median_ms"])
            ax.bar(xs, ys, width, yerr=[low, high], capsize=2, error_kw=dict(lw=0.8, ecolor="black"), label=m,
                   **_style(m, mi))
        for si, s in enumerate(sets):
            case = [r for r in cases_.get((s, opt, dtype), {}).values() if r.get("copy_gbps")]
            if case:  # the fewest bytes any method of the case must move, at the case's own bandwidth
                bound_ms = min(r["bytes_per_param"] for r in case) * case[0]["numel"] / (case[0]["copy_gbps"] * 1e6)
                ax.hlines(bound_ms, si - 0.45, si + 0.45, colors="black", linestyles="--", lw=1.4,
                          label=bound_label if si == 0 else None, zorder=5)
        for si, s in enumerate(sets):  # the headline: how many times faster than classic the fused step is
            case = cases_.get((s, opt, dtype), {})
            fused = headline_method(list(case.values()), (result.get("auto") or {}).get(dtype))
            x = ratio(case.get("classic"), case.get(fused), threshold)
            if x:
                f = case[fused]
                ax.annotate(f"{x['text']}\nvs classic", (si + (methods.index(fused) - (len(methods) - 1) / 2) * width,
                            f["q3_ms"]), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                            fontsize=8, fontweight="bold", zorder=6,
                            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
        ax.set_yscale("log")
        ax.margins(y=0.15)
        ax.set_xticks(range(len(sets)))
        ax.set_xticklabels(sets, fontsize=9)
        ax.set_title(f"{'SGD-momentum' if opt == 'sgd' else 'AdamW'}, {dtype}", fontsize=10)
        ax.grid(axis="y", which="both", lw=0.4, alpha=0.5)
        ax.set_axisbelow(True)
        if col == 0 or stacked:
            ax.set_ylabel(f"ms per SAM step (log scale)\nbar: median, whisker: quartiles over the rounds\n"
                          f"dashed: {bound_label}", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    threads = env.get("torch_threads")
    fig.suptitle(f"fused_sam bench: SAM optimizer step on {env.get('device_name')} ({env.get('device')}, "
                 f"{threads} threads), torch {env.get('torch')}, {provenance(env)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None
