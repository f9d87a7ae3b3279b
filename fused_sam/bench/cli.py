"""fused-sam bench: how much faster the fused SAM step is than classic SAM and the best stock-PyTorch SAM on
this machine, how close it comes to the memory-bandwidth limit, and whether every method ends at the same
weights. By default it times three methods on two or three parameter sets (about a minute on 2 CPU cores);
--full times every method on every default set (about 10 minutes there); --quick runs tiny sizes to check
that everything runs. See docs/bench.md."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import torch

from . import cases
from .measure import NOISE_THRESHOLD
from .report import machine_cores
from .runner import DTYPES

# Untimed steps, rounds, and timed steps per method per round, for the optimizer-step benchmark and for the
# end-to-end loop (both run `rounds` rounds).
DEFAULT_REPEATS = {
    "cuda": dict(warmup=5, rounds=10, repeats=3, e2e_warmup=3, e2e_repeats=2),
    "cpu": dict(warmup=2, rounds=5, repeats=2, e2e_warmup=2, e2e_repeats=1),
    "quick": dict(warmup=1, rounds=3, repeats=1, e2e_warmup=1, e2e_repeats=1),
}
# The 1-minute load average a machine shows with nothing much running; above the idle cores plus this, the
# run's threads share cores with other work and the header warns.
IDLE_LOAD = 0.5


def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fused-sam bench", description=__doc__)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda if available, else cpu")
    p.add_argument("--sets", default="default",
                   help="parameter sets: 'default' (CPU: resnet50, many_small; CUDA: resnet50, gpt2, many_small; "
                        "--full adds single16m on CPU, vit_b16 and single64m on CUDA), 'all', or a comma list of "
                        f"{', '.join(cases.SETS)}")
    p.add_argument("--optimizer", "--optimizers", dest="optimizers", default="sgd,adamw",
                   help="base optimizers, comma list of sgd, adamw (default both)")
    p.add_argument("--dtype", "--dtypes", dest="dtypes", default="default",
                   help="comma list of fp32, bf16, fp16, fp64; default: fp32 (+ bf16 on CUDA)")
    p.add_argument("--methods", default=None,
                   help="comma list among classic, torch-native, fused:BACKEND, fused:BACKEND+GradScaler, "
                        "fused:BACKEND+capturable, fused:BACKEND+master (bf16/fp16); default: classic, "
                        "torch-native and fused with the backend auto picks (--full: every one available)")
    p.add_argument("--warmup", type=int, default=None, help="untimed SAM steps per method before timing")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of timing; in each, every method of a case takes its timed steps in turn "
                        "(CUDA 10, CPU 5, --quick 3); the reported time is the median over rounds")
    p.add_argument("--repeats", type=int, default=None, help="timed SAM steps per method per round")
    p.add_argument("--noise-threshold", type=float, default=NOISE_THRESHOLD,
                   help=f"flag a row as noisy when its IQR / median over rounds exceeds this "
                        f"(default {NOISE_THRESHOLD})")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                   help="also time end-to-end training steps of two small models (default on)")
    p.add_argument("--e2e-repeats", type=int, default=None, help="timed training steps per e2e method per round")
    p.add_argument("--full", action="store_true",
                   help="every method available on every default set, and every end-to-end method (the "
                        "variants; graphed steps on CUDA)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (tests, smoke runs)")
    p.add_argument("--out", default="bench_out",
                   help="output folder for results.json, results.md (every method's row) and bench.png")
    p.add_argument("--no-flush", dest="flush", action="store_false",
                   help="do not flush the cache between timed steps")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="count GPU kernels per step with torch.profiler (CUDA; default on)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG plot")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    p.add_argument("--threads", type=int, default=machine_cores(),
                   help="torch.set_num_threads (default: the cores this process may use)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fused-sam bench: --device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def _dtypes(spec: str, device: torch.device) -> List[str]:
    if spec == "default":
        names = ["fp32"]
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            names.append("bf16")
        return names
    names = _csv(spec)
    for n in names:
        if n not in DTYPES:
            raise SystemExit(f"fused-sam bench: unknown dtype {n!r}; choose from {', '.join(DTYPES)}")
    return names


def _load_line(env: dict, threads: int) -> str:
    """What else was running: the load average before the run, against the cores and the threads it uses."""
    loads, cores = env["load_average_before"], env["cores_available"]
    line = f"{threads} threads on {cores} cores; "
    if loads is None:
        return line + "load average unknown"
    line += f"load average {loads[0]:.2f} / {loads[1]:.2f} / {loads[2]:.2f} (1 / 5 / 15 min) before the run"
    if loads[0] > cores - threads + IDLE_LOAD:
        fewer = max(1, int(cores - loads[0]))
        line += (f"\nwarning: 1-minute load average {loads[0]:.2f} on {cores} cores: other processes are using or "
                 f"waiting for the cores, so the {threads} threads of this run compete with them: expect slower, "
                 f"noisier timings (see the flags); rerun on an idle machine"
                 + (f" or with --threads {fewer}" if fewer < threads else ""))
    return line


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .e2e import run_e2e
    from .report import e2e_table, environment, headline_table, load_average, markdown, plot, write_json
    from .runner import Config, run_micro

    device = _device(args.device)
    if args.threads < 1:
        raise SystemExit("fused-sam bench: --threads must be >= 1")
    torch.set_num_threads(args.threads)
    defaults = DEFAULT_REPEATS["quick" if args.quick else device.type]
    optimizers = _csv(args.optimizers)
    for o in optimizers:
        if o not in ("sgd", "adamw"):
            raise SystemExit(f"fused-sam bench: unknown optimizer {o!r}; choose sgd, adamw")
    try:
        sets = cases.resolve_sets(args.sets, device.type, args.quick, args.full)
    except ValueError as exc:
        raise SystemExit(f"fused-sam bench: {exc}")
    cfg = Config(
        device=device, sets=sets, optimizers=optimizers, dtypes=_dtypes(args.dtypes, device),
        warmup=defaults["warmup"] if args.warmup is None else args.warmup,
        repeats=defaults["repeats"] if args.repeats is None else args.repeats,
        rounds=defaults["rounds"] if args.rounds is None else args.rounds,
        methods=_csv(args.methods) if args.methods else None, full=args.full, flush=args.flush, kernels=args.kernels,
        seed=args.seed, noise_threshold=args.noise_threshold,
    )
    e2e_repeats = defaults["e2e_repeats"] if args.e2e_repeats is None else args.e2e_repeats
    if cfg.repeats < 1 or cfg.rounds < 1 or e2e_repeats < 1 or cfg.warmup < 0:
        raise SystemExit("fused-sam bench: --rounds, --repeats and --e2e-repeats must be >= 1 and --warmup >= 0")
    progress = None
    if args.progress:
        from tqdm.auto import tqdm as progress
    os.makedirs(args.out, exist_ok=True)
    env = environment(device)
    print(f"fused-sam bench on {env['device_name']} ({device}); torch {env['torch']}, triton {env['triton']}; "
          f"sets {', '.join(sets)}; {', '.join(optimizers)}; {', '.join(cfg.dtypes)}; "
          f"warmup {cfg.warmup}, {cfg.rounds} rounds of {cfg.repeats} steps per method, interleaved", flush=True)
    print(_load_line(env, args.threads), flush=True)
    t0 = time.perf_counter()
    json_path = os.path.join(args.out, "results.json")
    payload = {
        "environment": env,
        "config": {"sets": sets, "optimizers": optimizers, "dtypes": cfg.dtypes, "warmup": cfg.warmup,
                   "rounds": cfg.rounds, "repeats": cfg.repeats, "e2e_repeats": e2e_repeats,
                   "noise_threshold": cfg.noise_threshold, "threads": args.threads, "flush": cfg.flush,
                   "quick": args.quick, "full": args.full, "argv": list(argv or sys.argv[1:])},
        "sets": {s: dict(zip(("tensors", "numel"), cases.summary(s)), description=cases.DESCRIPTIONS[s]) for s in sets},
        "partial": True,  # until the run completes: results.json is rewritten after every case
    }

    printed = [0, t0]  # rows printed so far, when the last case ended

    def save(micro_so_far=None, e2e_rows=None):
        if micro_so_far is not None:
            payload.update(copy_bandwidth=micro_so_far["copy"], results=micro_so_far["rows"],
                           auto_backend=micro_so_far["auto"])
            new = micro_so_far["rows"][printed[0]:]
            printed[0] += len(new)
            if new and not args.progress:  # a line per case, so a log shows how far a run got
                r0 = new[0]
                parts = [f"{r['method']} " + ("ERROR" if r.get("error") else f"{r['median_ms']:.3f} ms") for r in new]
                print(f"  {r0['set']} {r0['optimizer']} {r0['dtype']}: {', '.join(parts)} "
                      f"({time.perf_counter() - printed[1]:.1f} s)", flush=True)
                printed[1] = time.perf_counter()
        payload.update(e2e=e2e_rows, seconds=time.perf_counter() - t0)
        write_json(json_path, payload)

    micro = run_micro(cfg, progress=progress, on_case=save)
    print(headline_table(micro, cfg.noise_threshold, cfg.rounds), flush=True)
    e2e_rows = None
    if args.e2e:
        e2e_rows = run_e2e(device, defaults["e2e_warmup"], e2e_repeats, rounds=cfg.rounds, quick=args.quick,
                           progress=progress, noise_threshold=cfg.noise_threshold, full=args.full)
        print(e2e_table(e2e_rows, cfg.noise_threshold), flush=True)
    env["load_average_after"] = load_average()
    payload["partial"] = False
    save(micro, e2e_rows)
    md_path = os.path.join(args.out, "results.md")
    with open(md_path, "w") as f:
        f.write(markdown(payload))
    print(f"wrote {json_path} and {md_path} ({len(micro['rows'])} rows: every method of every case)")
    if args.plot:
        png = os.path.join(args.out, "bench.png")
        skipped = plot(png, micro, env, cfg.noise_threshold)
        print(skipped if skipped else f"wrote {png}")
    failed = [r for r in micro["rows"] if not r.get("verified")]
    failed_e2e = [r for r in (e2e_rows or []) if r.get("error") or not r.get("finite", False)]
    for r in failed:
        what = r.get("error") or f"final weights differ from {r.get('verified_against')} " \
                                  f"(max error / tolerance = {r.get('max_err_over_tol'):.3g})"
        print(f"NOT VERIFIED: {r['set']} {r['optimizer']} {r['dtype']} {r['method']}: {what}", file=sys.stderr)
    for r in failed_e2e:
        print(f"END-TO-END FAILED: {r['model']} {r['method']}: {r.get('error') or 'non-finite loss'}", file=sys.stderr)
    flagged = [r for r in micro["rows"] + (e2e_rows or []) if r.get("flags")]
    if flagged:  # reported, not fatal: the numbers are kept, with the reason not to trust them
        impossible = sum(any(f.startswith("impossible") for f in r["flags"]) for r in flagged)
        print(f"{len(flagged)} row(s) flagged ({impossible} impossible): the machine was too busy for their numbers "
              f"to be trusted; rerun on an idle machine, with more --rounds, or with fewer --threads")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 1 if failed or failed_e2e else 0


if __name__ == "__main__":
    sys.exit(main())
