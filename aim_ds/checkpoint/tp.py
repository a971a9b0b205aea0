"""Tensor-parallel checkpoints (DeepSpeed AutoTP, ZeRO stages 0-2) reassembled offline into whole
parameters: the fp32 weights from DeepSpeed's per-(data, tensor)-rank optimizer files, and the plugin's
anchor from its per-rank shards.

Each tensor-parallel rank t holds a slice of every cut parameter; its flat fp32 groups (the data-parallel
partitions of rank t, concatenated) hold those slices back to back, in the manifest's parameter order. The
manifest's layout records, per cut parameter, the dimension and the slice sizes (``tp_slices``), so the
slices are joined along that dimension in tensor-parallel rank order."""

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


def join(per_tp: list[dict[str, torch.Tensor]], layout: dict, cuts: dict) -> dict[str, torch.Tensor]:
    """Every tensor-parallel rank's local slices -> whole parameters (a parameter every rank holds whole is
    taken from rank 0)."""
    out = {}
    for g in layout["sub_groups"]:
        for name, shape, *_ in g["params"]:
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
    return join(per_tp, layout, cuts)


def _stage0_weights(tag_dir: str, layout: dict, t: int) -> dict[str, torch.Tensor]:
    """Stage 0, tensor-parallel rank t: the module's own state (frozen parameters included; the masters of fp32
    training), its trainable parameters replaced by the unfused bf16/fp16 optimizer's fp32 copies where saved
    (with its state, in the order of its groups: the layout's)."""
    sd = torch.load(os.path.join(tag_dir, f"mp_rank_{t:02d}_model_states.pt"), map_location="cpu", weights_only=False)
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


def model(tag_dir: str, m: dict) -> dict[str, torch.Tensor]:
    """The whole fp32 weights: stages 1-2 from the fp32 partitions in DeepSpeed's optimizer files of each
    (data, tensor)-parallel rank; stage 0 from each tensor-parallel rank's fp32 copies or fp32 weights.
    Also serves stage 0 without tensor parallelism (DeepSpeed's zero_to_fp32 reads stages 1-3 only)."""
    layout = m["layout"]
    where = os.path.join(tag_dir, MANIFEST)
    cuts, tp = _slices(layout, where), layout["tp_size"]
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
    out = join(per_tp, layout, cuts)
    # tied weights (a tied LM head) under their second name too, as DeepSpeed's zero_to_fp32 gives them
    ms = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    for name, source in (ms.get("shared_params") or {}).items():
        if source in out:
            out[name] = out[source]
    return out
