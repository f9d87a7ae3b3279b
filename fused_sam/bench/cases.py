"""Parameter sets: the shapes of real models' parameters, and two synthetic extremes. Shapes only, no weights.

Each set is a list of shapes; the benchmark allocates one tensor per shape. The counts match the
torchvision / Hugging Face models (checked in tests/test_bench_smoke.py):

- resnet50:   torchvision ``resnet50``: 161 tensors, 25,557,032 elements (conv + BatchNorm affine + fc).
- vit_b16:    torchvision ``vit_b_16``: 152 tensors, 86,567,656 elements.
- gpt2:       GPT-2 small (Hugging Face ``gpt2``, lm_head tied to wte): 148 tensors, 124,439,808 elements.
- single64m:  one tensor of 64 * 2**20 = 67,108,864 elements (pure bandwidth, no per-tensor cost).
- single16m:  one tensor of 16 * 2**20 elements (the CPU --full grid's, instead of single64m).
- many_small: 1000 tensors of 1024 elements (per-tensor overhead dominates).
- tiny:       a few odd-sized tensors (~10k elements) for --quick runs and tests.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

Shape = Tuple[int, ...]


def resnet50_shapes() -> List[Shape]:
    shapes: List[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def vit_b16_shapes() -> List[Shape]:
    d, mlp, layers = 768, 3072, 12
    shapes: List[Shape] = [(1, 1, d), (d, 3, 16, 16), (d,), (1, 197, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (mlp, d), (mlp,), (d, mlp), (d,)]
    shapes += [(d,), (d,), (1000, d), (1000,)]
    return shapes


def gpt2_shapes() -> List[Shape]:
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    shapes: List[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def tiny_shapes() -> List[Shape]:
    return [(64, 3, 3, 3), (64,), (64,), (37, 41), (1000,), (7,), (128, 64)]


SETS: Dict[str, callable] = {
    "resnet50": resnet50_shapes,
    "vit_b16": vit_b16_shapes,
    "gpt2": gpt2_shapes,
    "single64m": lambda: [(64 * 2**20,)],
    "single16m": lambda: [(16 * 2**20,)],
    "many_small": lambda: [(1024,)] * 1000,
    "tiny": tiny_shapes,
}
DESCRIPTIONS = {
    "resnet50": "ResNet-50 (161 tensors)",
    "vit_b16": "ViT-B/16 (152 tensors)",
    "gpt2": "GPT-2 small (148 tensors)",
    "single64m": "one 64M-element tensor",
    "single16m": "one 16M-element tensor",
    "many_small": "1000 tensors x 1k elements",
    "tiny": "7 small tensors (smoke test)",
}
# What --sets default / all / quick mean, per device type: by default a real model's shapes (where the bytes
# dominate) and many small tensors (where the per-tensor cost does); --full adds the pure-bandwidth case and,
# on CUDA, the larger models.
DEFAULT_SETS = {
    "cuda": ["resnet50", "gpt2", "many_small"],
    "cpu": ["resnet50", "many_small"],
}
FULL_SETS = {
    "cuda": ["resnet50", "vit_b16", "gpt2", "single64m", "many_small"],
    "cpu": ["resnet50", "many_small", "single16m"],
}
ALL_SETS = ["resnet50", "vit_b16", "gpt2", "single64m", "many_small"]
QUICK_SETS = ["tiny"]


def shapes(name: str) -> List[Shape]:
    if name not in SETS:
        raise ValueError(f"unknown parameter set {name!r}; choose from {', '.join(SETS)}")
    return SETS[name]()


def numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def summary(name: str) -> Tuple[int, int]:
    """(number of tensors, number of elements) of a set."""
    s = shapes(name)
    return len(s), sum(numel(x) for x in s)


def resolve_sets(spec: str, device_type: str, quick: bool = False, full: bool = False) -> List[str]:
    """'default' (``full``: the --full grid's), 'all', or a comma-separated list of set names."""
    if quick and spec == "default":
        return list(QUICK_SETS)
    if spec == "default":
        grid = FULL_SETS if full else DEFAULT_SETS
        return list(grid.get(device_type, grid["cpu"]))
    if spec == "all":
        return list(ALL_SETS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for n in names:
        shapes(n)
    return names
