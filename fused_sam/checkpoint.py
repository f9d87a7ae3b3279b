"""FusedSAM's state dict: what it saves, what it refuses to load, and how it loads into the flat buffers.

The format is torch.optim's (per-parameter tensors and 'step', the param groups) plus SAM's own, kept where
``torch.distributed.checkpoint`` keeps things: per parameter ('sam_master_weight': the float32 master
weight; 'sam_restore_point': w, in alternate mode and under MomentumSAM) and per param group (a copy of the
'sam' entry: SAM's counters and the variant's state). Only this format (4) is read; ``upgrade_state_dict``
converts the state dicts of earlier, unreleased versions.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List

import torch

from .distributed import local_of, sum_over_ranks
from .flat import merged_master
from .settings import SAM_KEYS, check_sam_settings
from .variants import LOOKSAM_KEY

STATE_DICT_FORMAT = 4
MASTER_KEY, RESTORE_KEY = "sam_master_weight", "sam_restore_point"  # per-parameter state SAM adds
BETWEEN_HALVES_KEY = "sam_between_halves"  # in each saved param group: taken between the halves of a step
# In each saved param group, a copy of the 'sam' entry: torch.distributed.checkpoint's get/set_optimizer_state_dict
# (the FSDP2 path) keep only 'state' and 'param_groups', and a variant decides from the step count. Live groups
# hold it as None: with flatten_optimizer_state_dict=True those helpers load only the keys live groups have.
PROGRESS_KEY = "sam_progress"
SAVED_GROUP_KEYS = (BETWEEN_HALVES_KEY, PROGRESS_KEY)  # in saved groups, not settings: never loaded into live ones
SAM_STATE_KEYS = (MASTER_KEY, RESTORE_KEY, LOOKSAM_KEY)  # per-parameter tensors SAM itself keeps
# What the classic SAM classes keep per parameter in their own state (the last w, the last e): leftovers of a
# step, not optimizer state. Their state dicts load with these dropped.
CLASSIC_KEYS = ("old_p", "e_w")
COUNTERS = ("completed_steps", "nonfinite_steps", "skipped_steps")


def saved_progress(state_dict: dict) -> dict:
    """The state dict's 'sam' entry; from a param group when only 'state' and 'param_groups' came through
    (torch.distributed.checkpoint's helpers keep those). Empty for a torch.optim state dict."""
    saved = state_dict.get("sam")
    if saved is None:
        groups = state_dict.get("param_groups") or [{}]
        saved = groups[0].get(PROGRESS_KEY) if isinstance(groups[0], dict) else None
    return saved or {}


def upgrade_state_dict(state_dict: dict) -> dict:
    """A FusedSAM state dict of format 1-3 (earlier, unreleased versions) in format 4; the tensors are
    shared, not copied. Format 1 saved SAM's epsilon as 'eps'; formats 1-2 kept the master weights and a
    mid-step restore point under 'sam', keyed by parameter; format 3 kept them per parameter, as 4 does."""
    sam = dict(state_dict.get("sam") or {})
    if sam.get("format", 1) >= STATE_DICT_FORMAT:
        return state_dict
    if "eps" in sam:
        sam["perturb_eps"] = sam.pop("eps")
    state = {k: dict(v) for k, v in state_dict["state"].items()}
    groups = [dict(g) for g in state_dict["param_groups"]]
    for k, value in (sam.pop("master_weights", None) or {}).items():
        state.setdefault(k, {})[MASTER_KEY] = value
    restore_point = sam.pop("restore_point", None)
    if restore_point is not None:
        for k, value in restore_point.items():
            state.setdefault(k, {})[RESTORE_KEY] = value
        for group in groups:
            group[BETWEEN_HALVES_KEY] = True
    sam["format"] = STATE_DICT_FORMAT
    sam["entries"] = sorted({n for s in state.values() for n in s if n in (MASTER_KEY, RESTORE_KEY)})
    for group in groups:
        group[PROGRESS_KEY] = sam
    return {"state": state, "param_groups": groups, "sam": sam}


def param_index(opt) -> Dict[int, int]:
    return {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}


# --- saving -------------------------------------------------------------------------------------------

def state_dict(opt) -> dict:
    """See ``FusedSAM.state_dict``."""
    sam = opt._sam
    if sam.perturbed is not None and opt.mode != "alternate":
        raise RuntimeError("state_dict() between first_step() and second_step(): the weights are perturbed")
    index = param_index(opt)
    check_finite(opt, weights=False)
    if opt._fused_kind:
        state = {}
        for segment in sam.segments:
            counts = segment.steps.tolist()
            for i, p in enumerate(segment.params):
                exported = segment.export_state(i, int(counts[i]))
                if exported:
                    state[index[id(p)]] = exported
        groups = [dict({k: v for k, v in g.items() if k != "params"}, params=[index[id(p)] for p in g["params"]])
                  for g in opt.param_groups]
        saved = {"state": state, "param_groups": groups}
    else:
        saved = opt.base_optimizer.state_dict()
        saved["state"] = {k: dict(v) for k, v in saved["state"].items()}  # entries are the live state dicts
    for pid, value in masters(sam.segments).items():
        saved["state"].setdefault(index[pid], {})[MASTER_KEY] = value
    if opt.mode == "alternate" or opt.variant.moves_between_steps:
        for pid, value in _restore_points(opt).items():
            saved["state"].setdefault(index[pid], {})[RESTORE_KEY] = value
        for group in saved["param_groups"]:
            group[BETWEEN_HALVES_KEY] = sam.perturbed is not None or opt.variant.perturbed_between_steps
    entries = sorted({k for s in saved["state"].values() for k in s if k in (MASTER_KEY, RESTORE_KEY)})
    saved["sam"] = {"format": STATE_DICT_FORMAT, "perturb_eps": sam.perturb_eps, "nonfinite_steps": opt.nonfinite_steps,
                    "skipped_steps": opt.skipped_steps, "completed_steps": sam.completed_steps,
                    "variant": dict(opt.variant.state_dict(), name=opt.variant.name), "entries": entries}
    for group in saved["param_groups"]:
        group[PROGRESS_KEY] = saved["sam"]
    return saved


def _restore_points(opt) -> Dict[int, torch.Tensor]:
    """Per parameter id, the weight a second half would restore: w (its backup) if it was perturbed,
    else the weight itself (restoring it is a no-op)."""
    sam = opt._sam
    masks = sam.perturbed if sam.perturbed is not None else [[opt.variant.perturbed_between_steps] * len(s.params)
                                                              for s in sam.segments]
    return {
        id(p): segment.backup_of(i) if mask is None or mask[i] else segment.current_weight(i)
        for segment, mask in zip(sam.segments, masks)
        for i, p in enumerate(segment.params)
    }


def masters(segments) -> Dict[int, torch.Tensor]:
    """Copies of the float32 master weights, by id of their parameter."""
    return {
        id(p): segment.master_of(i)
        for segment in segments if segment.master is not None
        for i, p in enumerate(segment.params)
    }


@torch.no_grad()
def check_finite(opt, weights: bool = True) -> None:
    """See ``FusedSAM.check_finite``."""
    index = param_index(opt)
    counted: List[tuple] = []  # (segment, buffer name, flat buffer, non-finite count, its sum over ranks)
    for segment in opt._sam.segments:
        buffers = dict(segment.state)
        if segment.master is not None:
            buffers[MASTER_KEY] = segment.master
        if weights:
            buffers["weight"] = segment.weights
        for name, buf in buffers.items():
            count = (~torch.isfinite(buf)).sum(dtype=torch.float64)
            handle = sum_over_ranks(count, segment.shard_group) if segment.shard_group is not None else None
            counted.append((segment, name, buf, count, handle))
    if not opt._fused_kind:  # the base optimizer's own state, per parameter
        for p, entry in opt.state.items():
            for name, value in entry.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"parameter {index[id(p)]} (shape {tuple(p.shape)}) holds non-finite "
                                     f"value(s) in its {name!r}: resume from an earlier checkpoint")
    for segment, name, buf, count, handle in counted:
        if handle is not None:
            handle.wait()
        if count.item() == 0:
            continue
        for i, p in enumerate(segment.params):
            view = segment.param_view(buf, i)
            if view.numel() and not bool(torch.isfinite(view).all()):
                break
        else:  # the non-finite values are in another rank's shard
            raise ValueError(f"{int(count.item())} non-finite value(s) in the optimizer's {name!r} buffers "
                             "(in another rank's shard)")
        raise ValueError(
            f"parameter {index[id(p)]} (param group {segment.group_index}, shape {tuple(p.shape)}) holds "
            f"{int((~torch.isfinite(view)).sum())} non-finite value(s) in its {name!r}: an edit through "
            "opt.state, a load that bypassed load_state_dict, or memory gone bad (training itself skips "
            "non-finite gradients). Resume from an earlier checkpoint."
        )


# --- loading ------------------------------------------------------------------------------------------

def load_state_dict(opt, state_dict: dict) -> None:
    """See ``FusedSAM.load_state_dict``."""
    sam = opt._sam
    if sam.perturbed is not None:
        raise RuntimeError("load_state_dict() between first_step() and second_step()")
    check_loadable(opt, state_dict)  # everything that could fail, before anything changes
    groups = state_dict["param_groups"]
    saved_sam = saved_progress(state_dict)
    order = [i for g in groups for i in g["params"]]
    state, saved_masters, restore_point = split_saved_state(state_dict["state"], groups)
    unused = set(SAM_STATE_KEYS) - {MASTER_KEY, RESTORE_KEY} - set(opt.variant.state_keys)
    state = {k: {n: v for n, v in s.items() if n not in unused} for k, s in state.items()}  # e.g. LookSAM's g_v
    moves_between_steps = opt.variant.moves_between_steps
    if restore_point is not None and opt.mode != "alternate" and not moves_between_steps:
        raise ValueError("this state dict was taken between the two halves of a mode='alternate' SAM step; "
                         "load it into FusedSAM(..., mode='alternate')")
    if restore_point is not None:
        _check_restore_point(opt, restore_point, order)
    groups = [{k: v for k, v in g.items() if k not in SAVED_GROUP_KEYS} for g in groups]
    if opt._fused_kind:
        load_fused_state(opt, {new: state[old] for new, old in enumerate(order) if old in state})
        for saved, group in zip(groups, opt.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
    else:
        _load_into_base(opt, state, groups)
    sam.perturb_eps = float(saved_sam.get("perturb_eps", sam.perturb_eps))
    sam.completed_steps, sam.sam_due = int(saved_sam.get("completed_steps", 0)), None
    saved_variant = dict(saved_sam.get("variant", {}))
    if saved_variant.pop("name", None) == opt.variant.name:
        opt.variant.load_state_dict(saved_variant)
    for counter, key in ((sam.nonfinite, "nonfinite_steps"), (sam.skipped, "skipped_steps")):
        if counter is not None:
            counter.fill_(int(saved_sam.get(key, 0)))
    if saved_masters is not None:
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        # Between the halves of an alternate-mode step the model's weights are w + e: leave them be.
        load_masters(sam.segments, {ids[new]: saved_masters[old] for new, old in enumerate(order) if old in saved_masters},
                     write_weights=restore_point is None)
    if restore_point is not None:
        _load_restore_point(opt, {new: restore_point[old] for new, old in enumerate(order) if old in restore_point})
        if moves_between_steps:  # the model holds w - rho v / ||v||, the backup w: between steps, not inside one
            sam.perturbed, opt.variant.perturbed_between_steps = None, True
    elif moves_between_steps:
        opt.variant.perturbed_between_steps = False
    opt.variant.state_loaded()


def _load_into_base(opt, state: dict, groups: List[dict]) -> None:
    """An unfused base optimizer loads its own state; torch.optim rebinds its state and param_groups, so
    the objects FusedSAM shares with it are refilled instead."""
    base = opt.base_optimizer
    sam_settings = [{k: g[k] for k in SAM_KEYS + (PROGRESS_KEY,) if k in g} for g in opt.param_groups]
    base.load_state_dict({"state": state, "param_groups": groups})
    loaded_state, loaded_groups = base.state, base.param_groups
    for loaded, settings in zip(loaded_groups, sam_settings):  # a torch.optim state dict has no rho
        for key, value in settings.items():
            loaded.setdefault(key, value)
    opt.state.clear()
    opt.state.update(loaded_state)
    opt.param_groups[:] = loaded_groups
    base.state, base.param_groups = opt.state, opt.param_groups


def split_saved_state(saved_state: dict, groups: List[dict]) -> tuple:
    """(base optimizer state, master weights or None, restore point or None), each keyed as saved."""
    state = {k: {n: v for n, v in s.items() if n not in (MASTER_KEY, RESTORE_KEY) + CLASSIC_KEYS}
             for k, s in saved_state.items()}
    saved_masters = {k: s[MASTER_KEY] for k, s in saved_state.items() if MASTER_KEY in s} or None
    restore_point = None
    if any(g.get(BETWEEN_HALVES_KEY) for g in groups):
        restore_point = {k: s[RESTORE_KEY] for k, s in saved_state.items() if RESTORE_KEY in s}
    return state, saved_masters, restore_point


def load_masters(segments, values: Dict[int, torch.Tensor], keep_edits: bool = False,
                 write_weights: bool = True) -> None:
    """Set master weights by id of their parameter, and the weights to their rounding if write_weights.
    keep_edits: only where the weight is still the rounding of the given master (a re-layout, where
    the weights themselves are current)."""
    for segment in segments:
        if segment.master is None:
            continue
        for i, p in enumerate(segment.params):
            value = values.get(id(p))
            if value is None:
                continue
            value = segment.local_value(i, value)
            segment.check_shape(i, value, "master weight")
            value = value.to(device=segment.device, dtype=torch.float32)
            if keep_edits:
                value = merged_master(value, segment.weight_views[i])
            segment.set_master(i, value, write_weights)
        if write_weights:
            segment.publish_weights()


def _check_restore_point(opt, restore_point: dict, order: list) -> None:
    """Refuse, before anything is loaded, a mid-step state dict without w for a parameter held here."""
    index = param_index(opt)
    missing = [order[index[id(p)]] for segment in opt._sam.segments for p in segment.params
               if order[index[id(p)]] not in restore_point]
    if missing:
        raise ValueError(
            f"this state dict was taken between the two halves of a SAM step but holds no restore point (w) "
            f"for parameters {missing[:5]}: the weights cannot be restored (was it loaded into a template "
            "without them? build the template from FusedSAM(..., mode='alternate'))"
        )


def _load_restore_point(opt, restore_point: dict) -> None:
    """Resume between the halves of an alternate-mode SAM step: w of each perturbed parameter."""
    index = param_index(opt)
    masks = []
    for segment in opt._sam.segments:
        mask = [index[id(p)] in restore_point for p in segment.params]
        for i, p in enumerate(segment.params):
            if mask[i]:
                segment.set_backup(i, restore_point[index[id(p)]])
        masks.append(None if all(mask) else mask)
    opt._sam.perturbed = masks


def load_fused_state(opt, state: dict) -> None:
    """Copy per-parameter state (keyed by this optimizer's parameter index) into the flat buffers."""
    index = param_index(opt)
    for segment in opt._sam.segments:
        segment.set_steps(
            [segment.import_state(i, state.get(index[id(p)], {})) for i, p in enumerate(segment.params)]
        )
        publish_state(opt, segment)


def publish_state(opt, segment) -> None:
    """Point ``opt.state[p]`` of the segment's parameters at views into its flat state buffers. Each entry
    dict is updated in place, so one a user holds stays current."""
    for i, p in enumerate(segment.params):
        entry = opt.state[p]
        entry.clear()
        entry.update(segment.state_views(i))
    segment.published = True


# --- what loads: every check before anything changes ------------------------------------------------

def check_loadable(opt, state_dict) -> None:
    """Refuse, with an error that says what is wrong, a state dict that cannot be loaded whole: not an
    optimizer state dict, another layout, another optimizer's state, values of the wrong shape or dtype,
    non-finite values, another format. Runs before anything changes, so a refused state dict leaves the
    optimizer (and the model's weights) as they were."""
    merged, order = _check_layout(opt, state_dict)
    saved_sam = saved_progress(state_dict)
    _check_progress(opt, saved_sam, state_dict["state"])
    _check_values(opt, state_dict["state"], merged, order)
    saved_variant = dict(saved_sam.get("variant") or {})
    if saved_variant.pop("name", None) == opt.variant.name:
        try:
            copy.deepcopy(opt.variant).load_state_dict(saved_variant)
        except Exception as exc:
            raise ValueError(f"the state dict's variant state does not load into {opt.variant!r}: "
                             f"{type(exc).__name__}: {exc}") from exc


def _check_layout(opt, state_dict) -> tuple:
    """The param groups match this optimizer's; returns each group's settings as loading would make them,
    and the saved parameter keys in this optimizer's parameter order."""
    if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
            and isinstance(state_dict.get("param_groups"), (list, tuple))):
        raise ValueError("not an optimizer state dict: it needs 'state' and 'param_groups'")
    groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"state dict has {len(groups)} param groups, this optimizer has {len(opt.param_groups)}")
    merged = []
    for gi, (saved, group) in enumerate(zip(groups, opt.param_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"param group {gi} of the state dict has no 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {gi} has {len(group['params'])} parameters, the state dict {len(saved['params'])}"
            )
        merged.append(dict(group, **{k: v for k, v in saved.items() if k != "params" and k not in SAVED_GROUP_KEYS}))
        check_sam_settings(merged[-1], f"param group {gi} of the state dict")
    order = [i for g in groups for i in g["params"]]
    if len(set(order)) != len(order):
        twice = next(i for i in order if order.count(i) > 1)
        raise ValueError(f"the state dict's param groups list parameter {twice!r} more than once")
    unlisted = [k for k in saved_state if k not in set(order)]
    if unlisted:
        raise ValueError(f"the state dict has state for parameter {unlisted[0]!r}, which no param group lists "
                         f"(they list {order[:8]}{'...' if len(order) > 8 else ''}): a corrupt state dict")
    if any(not isinstance(s, dict) for s in saved_state.values()):
        bad = next(k for k, s in saved_state.items() if not isinstance(s, dict))
        raise ValueError(f"the state of parameter {bad!r} is a {type(saved_state[bad]).__name__}, not a dict")
    return merged, order


def _check_progress(opt, saved_sam, saved_state: dict) -> None:
    """SAM's own entry: this format, counters, perturb_eps, the per-parameter entries it says it saved."""
    if not isinstance(saved_sam, dict):
        raise ValueError(f"the state dict's 'sam' entry is a {type(saved_sam).__name__}, not a dict")
    fmt = saved_sam.get("format", 1) if saved_sam else STATE_DICT_FORMAT  # none: a torch.optim state dict
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt > STATE_DICT_FORMAT:
        raise ValueError(f"this state dict has format {fmt!r}, newer than this fused_sam reads "
                         f"({STATE_DICT_FORMAT}): it was saved by a newer fused_sam")
    if fmt < STATE_DICT_FORMAT:
        raise ValueError(f"this state dict has format {fmt}, written by an earlier fused_sam: convert it with "
                         "fused_sam.checkpoint.upgrade_state_dict(state_dict) and load the result")
    entries = saved_sam.get("entries", [])
    if not (isinstance(entries, (list, tuple)) and all(isinstance(k, str) for k in entries)):
        raise ValueError(f"the state dict's sam['entries'] must be a list of key names, got {entries!r}")
    lost = [k for k in entries if not any(isinstance(s, dict) and k in s for s in saved_state.values())]
    if lost:
        raise ValueError(f"this state dict was saved with {lost} in its per-parameter state and has lost them "
                         "(torch.distributed.checkpoint's get/set_optimizer_state_dict with "
                         "flatten_optimizer_state_dict=True keep only the keys opt.state[p] shows): save it "
                         "with flatten_optimizer_state_dict=False or opt.state_dict()")
    for key in COUNTERS:
        value = saved_sam.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"the state dict's sam[{key!r}] must be a non-negative integer, got {value!r}")
    eps = saved_sam.get("perturb_eps", opt.perturb_eps)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"the state dict's perturb_eps must be a positive number, got {eps!r}")
    if any(isinstance(s, dict) and MASTER_KEY in s for s in saved_state.values()) and not opt.master_weights:
        raise ValueError("this state dict holds float32 master weights: load it into "
                         "FusedSAM(..., master_weights=True)")


def _check_values(opt, saved_state: dict, merged: List[dict], order: list) -> None:
    """Every saved tensor: a floating tensor of its parameter's shape, a state this base keeps, the states
    the group's settings need, whole step counts, and (one read back per device) finite."""
    params = [(gi, p) for gi, g in enumerate(opt.param_groups) for p in g["params"]]
    where = {id(p): (segment, i) for segment in opt._sam.segments for i, p in enumerate(segment.params)}
    kind = opt._fused_kind
    needed = [u.needed_state() for u in opt._base_updates(merged)] if kind else [()] * len(merged)
    kept = kind.state_names if kind else ()
    base_name = type(opt.base_optimizer).__name__
    checks = []  # (tensor, what): values whose finiteness is read in one go at the end

    def check_value(value, what: str, new: int):
        segment, i = where.get(id(params[new][1]), (None, None))
        if segment is not None:
            value = segment.local_value(i, value)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            raise ValueError(f"{what} has dtype {value.dtype}; optimizer state must be floating-point")
        shape = local_of(params[new][1]).shape if segment is None else segment.layout[i][0]
        if value.shape != shape:
            raise ValueError(f"{what} has shape {tuple(value.shape)}, the parameter {tuple(shape)}")
        checks.append((value, what))

    for new, old in enumerate(order):
        entry = saved_state.get(old)
        if entry is None:
            continue
        gi = params[new][0]
        names = [n for n, v in entry.items() if v is not None and n not in CLASSIC_KEYS]
        label = f"parameter {old!r} (param group {gi})"
        for name in names:
            what = f"state {name!r} of {label}"
            if name == "step":
                _check_step_count(entry[name], what)
            elif name in SAM_STATE_KEYS or kind:
                if name not in SAM_STATE_KEYS and name not in kept:
                    raise ValueError(
                        f"{what}: {base_name} does not keep {name!r} (FusedSAM over {base_name} keeps "
                        f"{', '.join(map(repr, kept + ('step',)))}): is this another optimizer's state dict?")
                check_value(entry[name], what, new)
        if kind:
            _check_needed_state(entry, names, kept, needed[gi], kind, label, base_name)
    _check_all_finite(checks)


def _check_step_count(step, what: str) -> None:
    count = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not (
            math.isfinite(count) and count >= 0 and count == int(count)):
        raise ValueError(f"{what} must be a non-negative whole number, got {step!r}")


def _check_needed_state(entry: dict, names: list, kept: tuple, needed: tuple, kind: type, label: str,
                        base_name: str) -> None:
    base_names = [n for n in names if n in kept or n == "step"]
    stepped = float(entry["step"]) > 0 if entry.get("step") is not None else bool(base_names)
    if kind.step_in_state and base_names and "step" not in base_names:
        raise ValueError(f"the state of {label} lacks 'step' ({base_name}'s update reads it)")
    lacking = [n for n in needed if n not in base_names]
    if stepped and lacking:
        raise ValueError(f"the state of {label} has taken steps but lacks {lacking[0]!r}, which "
                         f"{base_name} with these settings needs: a corrupt or mismatched state dict")


def _check_all_finite(checks: list) -> None:
    by_device: Dict[torch.device, list] = {}
    for k, (value, _) in enumerate(checks):
        by_device.setdefault(value.device, []).append(k)
    bad = []
    for indices in by_device.values():  # one read back per device
        finite = torch.stack([torch.isfinite(checks[k][0]).all() for k in indices]).cpu()
        bad += [indices[j] for j in (~finite).nonzero().flatten().tolist()]
    if bad:
        raise ValueError(f"non-finite values in {checks[min(bad)][1]}: a corrupt checkpoint (or one saved after "
                         "training diverged)")
