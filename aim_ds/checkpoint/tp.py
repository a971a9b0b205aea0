"""Tensor-parallel checkpoints (DeepSpeed AutoTP, ZeRO stages 0-2) reassembled offline into whole
parameters: the fp32 weights from DeepSpeed's per-(data, tensor)-rank optimizer files, and the plugin's
anchor from its per-rank shards.

Each tensor-parallel rank t holds a slice of every cut parameter; its flat fp32 groups (the data-parallel
partitions of rank t, concatenated) hold those slices back to back, in the manifest's parameter order. The
parameters outside the optimizer (frozen ones) are in no group: their slices are in each tensor-parallel
rank's module state. The manifest's layout records, per cut parameter (frozen ones too), the dimension and
the slice sizes (``tp_slices``), so the slices are joined along that dimension in tensor-parallel rank order."""

from __future__ import annotations

import glob
import math
import os

import torch

from .format import MANIFEST, CheckpointError


def _slices(layout: dict, where: str) -> dict:
    if layout.get("tp_size", 1) == 1:
        return {}
    out = layout.get("tp_slices")
    if out is None:
        raise CheckpointError(
            f"{where}: a tensor-parallel checkpoint without the slice layout (saved by an earlier version); "
            "convert it with DeepSpeed's universal-checkpoint tools instead"
        )
    for name, s in out.items():
        if s is not None and s[0] is None:
            raise CheckpointError(
                f"{where}: parameter {name} was cut by AutoTP in a way aim-ds convert cannot join ({s[2]}); "
                "convert this checkpoint with DeepSpeed's universal-checkpoint tools (ds_to_universal)"
            )
    return out


def _local_shape(shape: list, cut, t: int) -> list:
    if cut is None:
        return list(shape)
    dim, sizes = cut
    return [sizes[t] if d == dim else n for d, n in enumerate(shape)]


def _split_flat(flats: list[torch.Tensor], layout: dict, cuts: dict, t: int) -> dict[str, torch.Tensor]:
    """Tensor-parallel rank t's whole flat fp32 groups -> its local slice of every parameter."""
    out = {}
    for g, flat in zip(layout["sub_groups"], flats):
        off = 0
        for name, shape, *_ in g["params"]:
            local = _local_shape(shape, cuts.get(name), t)
            n = math.prod(local)
            if off + n > flat.numel():
                raise CheckpointError(
                    f"tensor-parallel rank {t}: group {g['param_group']} holds {flat.numel()} elements, fewer than "
                    f"its parameters' slices need ({name} ends at {off + n}); the layout does not match the files"
                )
            out[name] = flat[off : off + n].detach().reshape(local).clone()
            off += n
    return out


def _trained(layout: dict) -> list[list]:
    """[name, full shape] of every parameter in the optimizer's groups (the layout's), in its order."""
    return [[p[0], p[1]] for g in layout["sub_groups"] for p in g["params"]]


def join(per_tp: list[dict[str, torch.Tensor]], params: list[list], cuts: dict) -> dict[str, torch.Tensor]:
    """Every tensor-parallel rank's local slices of `params` ([name, full shape]) -> whole parameters (a
    parameter every rank holds whole is taken from rank 0)."""
    out = {}
    for name, shape in params:
        cut = cuts.get(name)
        t = per_tp[0][name] if cut is None else torch.cat([d[name] for d in per_tp], dim=cut[0])
        if list(t.shape) != list(shape):
            raise CheckpointError(f"{name}: joined shape {list(t.shape)}, the manifest says {list(shape)}")
        out[name] = t
    return out


def _by_position(states: list[dict], tp: int) -> list[list[dict]]:
    """Plugin states grouped [tp_rank][dp_rank] by the position each rank saved."""
    dp = len(states) // tp
    grid: list[list] = [[None] * dp for _ in range(tp)]
    for sd in states:
        pos = sd.get("position") or {}
        grid[pos.get("tp_rank", 0)][pos.get("dp_rank", 0)] = sd
    if any(x is None for row in grid for x in row):
        raise CheckpointError("the plugin states do not cover every (tensor, data)-parallel position once")
    return grid


def anchor(states: list[dict], m: dict, key: str, where: str) -> dict[str, torch.Tensor]:
    """The plugin's whole fp32 anchor from every rank's shards (stage 0: each rank holds its groups whole;
    stages 1-2: each data-parallel rank a partition of each group)."""
    layout = m["layout"]
    cuts, tp = _slices(layout, where), layout["tp_size"]
    per_tp = []
    for t, row in enumerate(_by_position(states, tp)):
        if layout["kind"] == "replicated":
            flats = [x.reshape(-1) for x in row[0][key]]
        else:
            flats = [torch.cat([sd[key][i].reshape(-1) for sd in row]) for i in range(len(layout["sub_groups"]))]
        per_tp.append(_split_flat(flats, layout, cuts, t))
    return join(per_tp, _trained(layout), cuts)


def _stage0_weights(tag_dir: str, layout: dict, t: int) -> dict[str, torch.Tensor]:
    """Stage 0, tensor-parallel rank t: the module's own state (frozen parameters included; the masters of fp32
    training), its trainable parameters replaced by the unfused bf16/fp16 optimizer's fp32 copies where saved
    (with its state, in the order of its groups: the layout's)."""
    sd = torch.load(os.path.join(tag_dir, model_states(t)), map_location="cpu", weights_only=False)
    out = {k: v.detach().float().clone() if v.is_floating_point() else v for k, v in sd["module"].items()}
    fp32 = (sd.get("optimizer") or {}).get("fp32_groups")
    if fp32 is None:
        return out
    masters = [x for grp in fp32 for x in grp]
    names = [p[0] for g in layout["sub_groups"] for p in g["params"]]
    if len(masters) != len(names):
        raise CheckpointError(f"{tag_dir}: {len(masters)} fp32 copies saved for the layout's {len(names)} parameters")
    out.update({n: x.detach().float().reshape(out[n].shape).clone() for n, x in zip(names, masters)})
    return out


def model_states(t: int) -> str:
    """Tensor-parallel rank t's module state file (stages 0-2: its slices of every parameter, frozen ones too)."""
    return f"mp_rank_{t:02d}_model_states.pt"


def local_weights(tag_dir: str, m: dict) -> list[dict[str, torch.Tensor]]:
    """Each tensor-parallel rank's fp32 slices of the trainable parameters: stages 1-2 from the fp32 partitions
    in DeepSpeed's optimizer files of each of its data-parallel ranks; stage 0 from its fp32 copies or fp32
    weights (its whole module state, frozen parameters included)."""
    layout = m["layout"]
    cuts, tp = _slices(layout, os.path.join(tag_dir, MANIFEST)), layout["tp_size"]
    dp = m["world_size"] // tp
    per_tp = []
    for t in range(tp):
        if layout["kind"] == "replicated":
            per_tp.append(_stage0_weights(tag_dir, layout, t))
            continue
        parts = []
        for d in range(dp):
            files = glob.glob(os.path.join(tag_dir, f"*zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt"))
            if len(files) != 1:
                raise CheckpointError(f"{tag_dir}: expected one optimizer file of data rank {d}, tensor rank {t}")
            osd = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
            parts.append(osd["single_partition_of_fp32_groups"])
        flats = [torch.cat([p[i].reshape(-1) for p in parts]).float() for i in range(len(layout["sub_groups"]))]
        per_tp.append(_split_flat(flats, layout, cuts, t))
    return per_tp


def _cut_of(name: str, shape: list, per_tp: list[dict], cuts: dict, where: str):
    """How a parameter outside the optimizer's groups was cut: as recorded, or, where the checkpoint records
    no cut for it (saved by an earlier version), whole when every rank holds it at its full shape."""
    if name in cuts:
        return cuts[name]
    if all(list(d[name].shape) == list(shape) for d in per_tp):
        return None
    raise CheckpointError(
        f"{where}: parameter {name} is cut over the tensor-parallel ranks, and the checkpoint does not record how "
        "(saved by an earlier version, which recorded the cuts of trainable parameters only); convert this "
        "checkpoint with DeepSpeed's universal-checkpoint tools (ds_to_universal)"
    )


def whole(per_tp: list[dict[str, torch.Tensor]], tag_dir: str, m: dict) -> dict[str, torch.Tensor]:
    """The whole fp32 weights from every tensor-parallel rank's local tensors (its trainable slices, plus the
    frozen parameters and buffers of its module state): every parameter the model names (the manifest's list,
    with full shapes) joined, tied names and floating-point buffers added. A parameter the model names that
    a rank does not hold is refused: a model without it would be silently random-initialised where loaded.
    Also serves stage 0 without tensor parallelism (DeepSpeed's zero_to_fp32 reads stages 1-3 only)."""
    layout, where = m["layout"], os.path.join(tag_dir, MANIFEST)
    cuts, trained = _slices(layout, where), _trained(layout)
    others = [[n, s] for n, s in m["model"]["params"] if n not in {x[0] for x in trained}]
    missing = [n for n, _ in others if any(n not in d for d in per_tp)]
    if missing:
        raise CheckpointError(
            f"{tag_dir}: parameter {missing[0]} ({len(missing)} in all: {missing[:3]}) is named by the model but is "
            "in no file of the checkpoint (one outside the optimizer, a frozen one, is read from each "
            "tensor-parallel rank's module state); convert a checkpoint that holds every parameter, as "
            "aim_ds.checkpoint.save_checkpoint writes them"
        )
    cuts = {**cuts, **{n: _cut_of(n, s, per_tp, cuts, where) for n, s in others}}
    out = join(per_tp, trained + others, cuts)
    # tied weights (a tied LM head) under their second name too, as DeepSpeed's zero_to_fp32 gives them
    ms = torch.load(os.path.join(tag_dir, model_states(0)), map_location="cpu", weights_only=False, mmap=True)
    for name, source in (ms.get("shared_params") or {}).items():
        if source in out:
            out[name] = out[source]
    # the buffers, as the other conversions keep them (AutoTP cuts parameters only); without tensor parallelism
    # also a tied weight's second name where DeepSpeed records no pairing (stage 0 in fp32), rank 0's being whole
    keep = per_tp[0] if len(per_tp) == 1 else (ms.get("buffer_names") or [])
    out.update({k: per_tp[0][k] for k in keep if k in per_tp[0] and k not in out and per_tp[0][k].is_floating_point()})
    return out
