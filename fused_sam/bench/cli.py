"""fused-sam bench: how much faster the fused SAM step is than classic SAM and the best stock-PyTorch SAM on
this machine, and how close it comes to the memory-bandwidth limit. See docs/bench.md."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import torch

from . import cases
from .runner import DTYPES

# (warmup, repeats) for the optimizer-step benchmark and for the end-to-end loop.
DEFAULT_REPEATS = {
    "cuda": dict(warmup=5, repeats=30, e2e_warmup=3, e2e_repeats=20),
    "cpu": dict(warmup=2, repeats=10, e2e_warmup=2, e2e_repeats=5),
    "quick": dict(warmup=1, repeats=3, e2e_warmup=1, e2e_repeats=2),
}


def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fused-sam bench", description=__doc__)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda if available, else cpu")
    p.add_argument("--sets", default="default",
                   help="parameter sets: 'default' (per device), 'all', or a comma list of "
                        f"{', '.join(cases.SETS)}")
    p.add_argument("--optimizer", "--optimizers", dest="optimizers", default="sgd,adamw",
                   help="base optimizers, comma list of sgd, adamw (default both)")
    p.add_argument("--dtype", "--dtypes", dest="dtypes", default="default",
                   help="comma list of fp32, bf16, fp16, fp64; default: fp32 (+ bf16 on CUDA)")
    p.add_argument("--methods", default=None,
                   help="comma list among classic, torch-native, fused:<backend>, fused:<backend>+GradScaler, "
                        "fused:<backend>+capturable, fused:<backend>+master (bf16/fp16) (default: all available)")
    p.add_argument("--warmup", type=int, default=None, help="untimed SAM steps per method before timing")
    p.add_argument("--repeats", type=int, default=None, help="timed SAM steps per method")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                   help="also time end-to-end training steps of two small models (default on)")
    p.add_argument("--e2e-repeats", type=int, default=None, help="timed training steps per e2e method")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (tests, smoke runs)")
    p.add_argument("--out", default="bench_out", help="output folder for results.json and bench.png")
    p.add_argument("--no-flush", dest="flush", action="store_false",
                   help="do not flush the cache between timed steps")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="count GPU kernels per step with torch.profiler (CUDA; default on)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG plot")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .e2e import run_e2e
    from .report import e2e_table, environment, markdown, micro_table, plot, write_json
    from .runner import Config, run_micro

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = DEFAULT_REPEATS["quick" if args.quick else device.type]
    optimizers = _csv(args.optimizers)
    for o in optimizers:
        if o not in ("sgd", "adamw"):
            raise SystemExit(f"fused-sam bench: unknown optimizer {o!r}; choose sgd, adamw")
    try:
        sets = cases.resolve_sets(args.sets, device.type, args.quick)
    except ValueError as exc:
        raise SystemExit(f"fused-sam bench: {exc}")
    cfg = Config(
        device=device, sets=sets, optimizers=optimizers, dtypes=_dtypes(args.dtypes, device),
        warmup=defaults["warmup"] if args.warmup is None else args.warmup,
        repeats=defaults["repeats"] if args.repeats is None else args.repeats,
        methods=_csv(args.methods) if args.methods else None, flush=args.flush, kernels=args.kernels,
        seed=args.seed,
    )
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise SystemExit("fused-sam bench: --repeats must be >= 1 and --warmup >= 0")
    progress = None
    if args.progress:
        from tqdm.auto import tqdm as progress
    os.makedirs(args.out, exist_ok=True)
    env = environment(device)
    print(f"fused-sam bench on {env['device_name']} ({device}); torch {env['torch']}, triton {env['triton']}; "
          f"sets {', '.join(sets)}; {', '.join(optimizers)}; {', '.join(cfg.dtypes)}; "
          f"warmup {cfg.warmup}, repeats {cfg.repeats}", flush=True)
    t0 = time.perf_counter()
    json_path = os.path.join(args.out, "results.json")
    payload = {
        "environment": env,
        "config": {"sets": sets, "optimizers": optimizers, "dtypes": cfg.dtypes, "warmup": cfg.warmup,
                   "repeats": cfg.repeats, "flush": cfg.flush, "quick": args.quick, "argv": list(argv or sys.argv[1:])},
        "sets": {s: dict(zip(("tensors", "numel"), cases.summary(s)), description=cases.DESCRIPTIONS[s]) for s in sets},
        "partial": True,  # until the run completes: results.json is rewritten after every case
    }

    printed = [0]

    def save(micro_so_far=None, e2e_rows=None):
        if micro_so_far is not None:
            payload.update(copy_bandwidth=micro_so_far["copy"], results=micro_so_far["rows"])
            new = micro_so_far["rows"][printed[0]:]
            printed[0] += len(new)
            if new and not args.progress:  # a line per case, so a log shows how far a run got
                r0 = new[0]
                parts = [f"{r['method']} " + ("ERROR" if r.get("error") else f"{r['median_ms']:.3f} ms") for r in new]
                print(f"  {r0['set']} {r0['optimizer']} {r0['dtype']}: {', '.join(parts)} "
                      f"({sum(r['seconds'] for r in new):.1f} s)", flush=True)
        payload.update(e2e=e2e_rows, seconds=time.perf_counter() - t0)
        write_json(json_path, payload)

    micro = run_micro(cfg, progress=progress, on_case=save)
    print(micro_table(micro, device.type), flush=True)
    e2e_rows = None
    if args.e2e:
        e2e_rows = run_e2e(device, defaults["e2e_warmup"],
                           defaults["e2e_repeats"] if args.e2e_repeats is None else args.e2e_repeats,
                           quick=args.quick, progress=progress)
        print(e2e_table(e2e_rows), flush=True)
    payload["partial"] = False
    save(micro, e2e_rows)
    md_path = os.path.join(args.out, "results.md")
    with open(md_path, "w") as f:
        f.write(markdown(payload))
    print(f"wrote {json_path}, {md_path}")
    if args.plot:
        png = os.path.join(args.out, "bench.png")
        skipped = plot(png, micro, env)
        print(skipped if skipped else f"wrote {png}")
    failed = [r for r in micro["rows"] if not r.get("verified")]
    failed_e2e = [r for r in (e2e_rows or []) if r.get("error") or not r.get("finite", False)]
    for r in failed:
        what = r.get("error") or f"final weights differ from {r.get('verified_against')} " \
                                  f"(max error / tolerance = {r.get('max_err_over_tol'):.3g})"
        print(f"NOT VERIFIED: {r['set']} {r['optimizer']} {r['dtype']} {r['method']}: {what}", file=sys.stderr)
    for r in failed_e2e:
        print(f"END-TO-END FAILED: {r['model']} {r['method']}: {r.get('error') or 'non-finite loss'}", file=sys.stderr)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 1 if failed or failed_e2e else 0


if __name__ == "__main__":
    sys.exit(main())
