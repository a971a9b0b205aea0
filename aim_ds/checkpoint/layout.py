"""Partition layout arithmetic: how ZeRO-3 cuts parameters into per-rank flat sub-group shards, and the
gather / scatter / re-split of such shards (offline: no process group, no engine).

A layout (as recorded in a checkpoint's manifest) is
``{"world_size": W, "sub_group_size": S, "sub_groups": [{"param_group", "partition_count",
"params": [[name, shape, numel, partition_numel], ...]}, ...]}``; each rank's flat shard of a sub-group
holds partition_numel slots per parameter, of which `valid_numel` are real elements.
"""

from __future__ import annotations

import math

import torch

from ..shards import valid_numel
from .format import CheckpointError


def split_layout(layout: dict, world: int) -> dict:
    """The layout DeepSpeed builds for the same parameters on `world` ranks (its _create_fp16_sub_groups)."""
    by_group: dict[int, list] = {}
    for g in layout["sub_groups"]:
        by_group.setdefault(g["param_group"], []).extend(g["params"])
    size = layout["sub_group_size"]
    out = []
    for gid, params in by_group.items():
        params = [[n, s, numel, math.ceil(numel / world)] for n, s, numel, _ in params]
        total = sum(p[3] for p in params)
        if size is None or size >= total:
            chunks = [params]
        else:
            chunks, cur, acc = [], [], 0
            for j, p in enumerate(params):
                cur.append(p)
                acc += p[3]
                if acc >= size or j == len(params) - 1:
                    chunks.append(cur)
                    cur, acc = [], 0
        out += [{"param_group": gid, "partition_count": world, "params": c} for c in chunks]
    return {"world_size": world, "sub_group_size": size, "sub_groups": out}


def flat_sizes(layout: dict) -> list[int]:
    return [sum(p[3] for p in g["params"]) for g in layout["sub_groups"]]


def _pieces(group: dict, rank: int):
    """(name, offset in the rank's flat shard, offset in the full parameter, valid length) per parameter."""
    off = 0
    for n, _, numel, pn in group["params"]:
        yield n, off, rank * pn, valid_numel(numel, pn, rank)
        off += pn


def gather(shards_by_rank: list[list[torch.Tensor]], layout: dict) -> dict[str, torch.Tensor]:
    """Per-rank flat sub-group shards -> full flat tensor per parameter name."""
    if layout.get("kind") in ("flat", "replicated"):  # ZeRO stages 0-2 (aim_ds.shards.ZeroShards.layout)
        return _gather_flat(shards_by_rank, layout)
    full: dict[str, torch.Tensor] = {}
    for gi, g in enumerate(layout["sub_groups"]):
        for n, _, numel, _ in g["params"]:
            full[n] = torch.zeros(numel, dtype=shards_by_rank[0][gi].dtype)
        for r in range(layout["world_size"]):
            flat = shards_by_rank[r][gi]
            for n, off, start, k in _pieces(g, r):
                if k:
                    full[n][start : start + k] = flat[off : off + k]
    return full


def _gather_flat(shards_by_rank: list[list[torch.Tensor]], layout: dict) -> dict[str, torch.Tensor]:
    """Every rank's per-group flat shards (a stage 0-2 layout from `ZeroShards.layout`) -> the full flat
    fp32 tensor of each parameter. Tensor-parallel slices are not reassembled: refused."""
    if layout.get("tp_size", 1) != 1:
        raise CheckpointError(
            f"aim_merging: the plugin's shards were saved with tensor-parallel size {layout['tp_size']}; "
            "reassembling tensor-parallel slices is not supported (convert the model weights with "
            "DeepSpeed's tools instead)."
        )
    full: dict[str, torch.Tensor] = {}
    for gi, g in enumerate(layout["sub_groups"]):
        if layout["kind"] == "replicated":
            flat = shards_by_rank[0][gi]  # every rank holds it whole
        else:
            flat = torch.cat([shards_by_rank[r][gi] for r in range(g["partition_count"])])
        for name, _, numel, off in g["params"]:
            full[name] = flat[off : off + numel].clone()
    return full


def scatter(full: dict[str, torch.Tensor], layout: dict) -> list[list[torch.Tensor]]:
    """Full per-parameter tensors -> per-rank flat sub-group shards (zero padding) for `layout`."""
    dtype = next(iter(full.values())).dtype
    out = []
    for r in range(layout["world_size"]):
        shards = []
        for g, size in zip(layout["sub_groups"], flat_sizes(layout)):
            flat = torch.zeros(size, dtype=dtype)
            for n, off, start, k in _pieces(g, r):
                if k:
                    flat[off : off + k] = full[n][start : start + k]
            shards.append(flat)
        out.append(shards)
    return out


# ---------------------------------------------------------------------------------------------- plugin state
def shard_lists(sd: dict, n_groups: int, path=()):
    """Paths in a plugin state dict whose value is a per-sub-group list of flat shard tensors."""
    for k, v in sd.items():
        if isinstance(v, dict):
            yield from shard_lists(v, n_groups, path + (k,))
        elif isinstance(v, (list, tuple)) and v and all(torch.is_tensor(t) for t in v):
            if len(v) != n_groups:
                raise CheckpointError(
                    f"plugin state entry {'.'.join(path + (k,))} has {len(v)} tensors for "
                    f"{n_groups} sub-groups; cannot reshard it."
                )
            yield path + (k,)
        elif torch.is_tensor(v):
            raise CheckpointError(
                f"plugin state entry {'.'.join(path + (k,))} is a tensor that is not a list of "
                "per-sub-group shards; aim_ds.checkpoint does not know how to reshard it."
            )


def get_path(sd, path):
    for k in path:
        sd = sd[k]
    return sd


def set_path(sd, path, value):
    for k in path[:-1]:
        sd = sd[k]
    sd[path[-1]] = value


def reshard_plugin(states: list[dict], old: dict, new: dict) -> list[dict]:
    """Every rank's plugin state_dict for layout `old` -> one per rank of layout `new` (shards re-split;
    rank 0 keeps the controller and trajectory)."""
    n_old = len(old["sub_groups"])
    paths = list(shard_lists(states[0], n_old)) if states[0].get("enabled") else []
    split = {}
    for p in paths:  # one full buffer at a time on the host
        split[p] = scatter(gather([get_path(s, p) for s in states], old), new)
    out = []
    for r in range(new["world_size"]):
        base = states[min(r, len(states) - 1)]
        sd = {k: v for k, v in base.items()}
        for k in ("ema",):  # nested dicts of shard lists: shallow-copy before replacing entries
            if isinstance(sd.get(k), dict):
                sd[k] = dict(sd[k])
        if sd.get("enabled"):
            sd["rank"], sd["world_size"] = r, new["world_size"]
            sd["controller"] = states[0].get("controller") if r == 0 else None
        sd["trajectory"] = list(states[0]["trajectory"]) if r == 0 else []
        for p in paths:
            set_path(sd, p, split[p][r])
        out.append(sd)
    return out
