"""AimMerging under DeepSpeed's PipelineEngine (CPU, gloo): a small token model cut into pipeline stages, trained
with train_batch, the plugin probing with eval_batch and rehearsing with train_batch on every stage.

World = stages x data-parallel ranks. Every layer is seeded by its index (PipelineModule's seed_layers), so a run
at 1 stage and one at 2 stages start from the same weights and see the same micro-batches: their merges, losses
and weights must agree up to fp32 reduction order.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn

import aim_ds
from aim_ds.checkpoint import load_checkpoint, save_checkpoint
from aim_ds.experiment.pipeline import from_tensor_parallel, to_tensor_parallel

VOCAB, HIDDEN, LENGTH, MICRO, GAS = 61, 24, 10, 2, 2
# the reference rule probes every step (eval_batch on every stage) and merges when the forgetting signal rises
AIM = {"enabled": True, "interval_rule": "reference", "initial_interval": 3, "min_interval": 2, "max_interval": 8}


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, HIDDEN)

    def forward(self, ids):
        return self.tok(ids)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.up, self.down = nn.Linear(HIDDEN, 2 * HIDDEN), nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, h):
        return h + self.down(torch.tanh(self.up(self.norm(h))))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.out = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, VOCAB)

    def forward(self, h):
        return self.out(self.norm(h))


class BlockTP(nn.Module):
    """Block with Megatron-style tensor parallelism: `up` cut by output rows (column-parallel), `down` by input
    columns (row-parallel, its bias added once after the sum). Each rank builds the whole layer from the same seed
    and keeps its slice, so any tensor-parallel size starts from the same weights."""

    def __init__(self, tp_rank: int, tp_size: int, group):
        super().__init__()
        self.group, self.tp = group, tp_size
        self.norm = nn.LayerNorm(HIDDEN)
        up, down = nn.Linear(HIDDEN, 2 * HIDDEN), nn.Linear(2 * HIDDEN, HIDDEN)
        part = 2 * HIDDEN // tp_size
        rows = slice(tp_rank * part, (tp_rank + 1) * part)
        self.up_w = nn.Parameter(up.weight.detach()[rows].clone())
        self.up_b = nn.Parameter(up.bias.detach()[rows].clone())
        self.down_w = nn.Parameter(down.weight.detach()[:, rows].clone())
        self.down_b = nn.Parameter(down.bias.detach().clone())
        for p in (self.up_w, self.up_b, self.down_w):
            p.tensor_model_parallel = True  # what DeepSpeed's is_model_parallel_parameter reads

    def forward(self, h):
        x = self.norm(h)
        if self.tp > 1:
            x = to_tensor_parallel(x, self.group)
        part = nn.functional.linear(torch.tanh(nn.functional.linear(x, self.up_w, self.up_b)), self.down_w)
        if self.tp > 1:
            part = from_tensor_parallel(part, self.group)
        return h + part + self.down_b


def token_loss(logits, labels):
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)


def make_engine(
    pp: int, stage: int = 1, aim: dict | None = None, lr: float = 3e-3, clip: float = 1.0, tp: int | None = None
):
    """tp: a Megatron-style tensor-parallel size (the pipeline's grid is the engine's mpu), else no tensor
    parallelism at all (the plain blocks)."""
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

    torch.manual_seed(0)
    if tp is None:
        blocks, where = [LayerSpec(Block) for _ in range(4)], {"num_stages": pp}
        dp = tdist.get_world_size() // pp
    else:
        dp = tdist.get_world_size() // (pp * tp)
        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        grid = PipelineParallelGrid(topology=topo)  # the tensor-parallel group the blocks reduce over
        group = grid.get_slice_parallel_group() if tp > 1 else None
        blocks = [LayerSpec(BlockTP, grid.get_slice_parallel_rank(), tp, group) for _ in range(4)]
        where = {"topology": topo}
    specs = [LayerSpec(Embed), *blocks, LayerSpec(Head)]
    module = PipelineModule(
        specs, loss_fn=token_loss, partition_method="uniform", seed_layers=True, base_seed=7, **where
    )
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "train_batch_size": MICRO * GAS * dp,
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "aim_merging": dict(aim or AIM),
    }
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=cfg)
    return engine


def dp_rank(engine) -> int:
    return tdist.get_rank(group=engine.grid.get_data_parallel_group())


def rows(seed: int, n: int = MICRO) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return {"input_ids": ids, "labels": labels}


def micro_batches(engine, step: int) -> list[tuple]:
    """This data-parallel rank's GAS micro-batches of a step: the same at any number of stages."""
    out = []
    for m in range(GAS):
        b = rows(10_000 + 100 * step + 10 * dp_rank(engine) + m)
        out.append((b["input_ids"], b["labels"]))
    return out


def memory(engine, n: int = 3) -> list[dict]:
    return [rows(50_000 + 100 * dp_rank(engine) + i) for i in range(n)]


def train(engine, first_step: int, n: int) -> list[float]:
    return [float(engine.train_batch(iter(micro_batches(engine, first_step + i)))) for i in range(n)]


def whole_model(engine) -> dict:
    """Every stage's weights by layer name ("3.up.weight"), gathered on every rank; tensor-parallel slices
    joined (up_w, up_b by rows, down_w by columns), as one rank would hold them without tensor parallelism."""
    own = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    got = [None] * tdist.get_world_size()
    tdist.all_gather_object(got, (engine.grid.get_slice_parallel_rank(), own))
    out, slices = {}, {}
    for tp_rank, d in got:
        for k, v in d.items():
            slices.setdefault(k, {})[tp_rank] = v
    for k, by_rank in slices.items():
        parts = [by_rank[r] for r in sorted(by_rank)]
        if k.endswith(("up_w", "up_b")):
            out[k] = torch.cat(parts, 0)
        elif k.endswith("down_w"):
            out[k] = torch.cat(parts, 1)
        else:
            out[k] = parts[0]
    return out


def _trajectory(plugin) -> list[dict]:
    keep = ("task", "step", "probe_loss", "learning_signal", "merge", "interval", "rehearsal_steps", "undone")
    return [{k: r[k] for k in keep} for r in plugin.trajectory]


def two_tasks(pp: int, steps0: int = 3, steps1: int = 7, stage: int = 1, tp: int | None = None) -> dict:
    """Task 0 without merging, task 1 probed every step and merging by the reference rule. At stage 0 without
    clipping: there DeepSpeed clips each stage by its own gradient norm, so 2 stages would not train as 1."""
    engine = make_engine(pp, stage=stage, clip=1.0 if stage else 0.0, tp=tp)
    plugin = aim_ds.attach(engine)
    plugin.start_task()
    losses = train(engine, 0, steps0)
    plugin.start_task(memory=memory(engine))
    losses += train(engine, 100, steps1)
    return {
        "losses": losses,
        "trajectory": _trajectory(plugin) if tdist.get_rank() == 0 else None,
        "merges": plugin.merge_count,
        "work": dict(plugin.work),
        "weights": {k: v.reshape(-1).tolist() for k, v in whole_model(engine).items()},
        "position": plugin.shards.position,
    }


def failed_merge_undone_everywhere(pp: int) -> dict:
    """A merge whose fusion fails on the last stage's ranks only: every stage's weights and optimizer state
    go back to theta_k (the weights before the merge) and the run trains on."""
    from aim_ds.ops import fusion

    engine = make_engine(pp, aim={**AIM, "initial_interval": 50, "max_interval": 64})
    plugin = aim_ds.attach(engine)
    plugin.start_task()
    train(engine, 0, 2)
    plugin.start_task(memory=memory(engine))
    train(engine, 100, 2)
    before = whole_model(engine)
    real = fusion.fuse_scalar
    if engine.is_last_stage():

        def broken(theta, *args, **kwargs):
            theta.narrow(0, 0, theta.numel() // 2).mul_(3.0)
            raise MemoryError("injected: out of memory in fusion")

        fusion.fuse_scalar = broken
    try:
        rec = plugin.merge()
    finally:
        fusion.fuse_scalar = real
    after = whole_model(engine)
    diff = max(float((after[k] - before[k]).abs().max()) for k in before)
    train(engine, 200, 1)
    rec2 = plugin.merge()
    return {"merged": rec["merged"], "diff": diff, "next_merged": rec2["merged"], "merges": plugin.merge_count}


def resume(pp: int, ckpt: str, tp: int | None = None) -> dict:
    """Task 1 interrupted after its first merge (step 4) and resumed from a checkpoint in a fresh engine, against
    the same run uninterrupted: the same weights, bit for bit, and the same trajectory."""
    import deepspeed

    def run(split: bool):
        engine = make_engine(pp, tp=tp)
        plugin = aim_ds.attach(engine)
        plugin.start_task()
        train(engine, 0, 2)
        plugin.start_task(memory=memory(engine))
        train(engine, 100, 4)
        if split:
            save_checkpoint(engine, plugin, ckpt, tag="mid")
            deepspeed.comm.barrier()
            engine = make_engine(pp, tp=tp)
            plugin = aim_ds.attach(engine, memory(engine))
            load_checkpoint(engine, plugin, ckpt, tag="mid")
        train(engine, 104, 4)
        return whole_model(engine), _trajectory(plugin) if tdist.get_rank() == 0 else None, plugin.merge_count

    w_full, t_full, m_full = run(False)
    w_split, t_split, m_split = run(True)
    return {
        "max_diff": max(float((w_full[k] - w_split[k]).abs().max()) for k in w_full),
        "same_trajectory": t_full == t_split,
        "merges": (m_full, m_split),
    }


def save_for_other_size(pp: int, ckpt: str) -> dict:
    """A checkpoint at `pp` stages (for the test that resumes it at another size)."""
    engine = make_engine(pp)
    plugin = aim_ds.attach(engine)
    plugin.start_task()
    train(engine, 0, 1)
    save_checkpoint(engine, plugin, ckpt, tag="t")
    return {"saved": True}


def load_at(pp: int, ckpt: str) -> dict:
    engine = make_engine(pp)
    plugin = aim_ds.attach(engine)
    try:
        load_checkpoint(engine, plugin, ckpt, tag="t")
    except Exception as e:  # noqa: BLE001 - the test reads the message
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


def make_engine_only(pp: int, stage: int) -> dict:
    engine = make_engine(pp, stage=stage)
    aim_ds.attach(engine)
    return {"built": True}


def forever_two_tasks(pp: int) -> dict:
    """FOREVER on the pipeline: model time from the stages' updates (one all-reduce of every rank's squared
    change), replay events and the end-of-task replay as train_batch steps with the L2 pull on each stage."""
    from aim_ds.config import ForeverConfig

    engine = make_engine(pp)
    cfg = ForeverConfig(day_steps=2, days=(1.0, 2.0, 4.0), replay_steps=2, consolidation_steps=1, beta_base=0.1)
    plugin = aim_ds.attach(engine, config=cfg)
    plugin.start_task()
    train(engine, 0, 3)
    plugin.end_task()
    plugin.start_task(memory=memory(engine))
    train(engine, 100, 6)
    plugin.end_task()
    rows = plugin.trajectory if tdist.get_rank() == 0 else []
    return {
        "deltas": [r["delta"] for r in rows if r.get("delta") is not None],
        "replays": [
            (r["task"], r["step"], r["replay"], r["replay_steps"]) for r in rows if r.get("replay") is not None
        ],
        "work": dict(plugin.work),
        "weights": {k: v.reshape(-1).tolist() for k, v in whole_model(engine).items()},
    }


def bad_memory(pp: int) -> dict:
    """attach with memory the default pipe_batch cannot read (no input_ids), and with float labels."""
    engine = make_engine(pp)
    errors = []
    for mem in ([{"labels": rows(1)["labels"]}], [{**rows(1), "labels": rows(1)["labels"].float()}]):
        try:
            aim_ds.attach(engine, mem)
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - the test reads the message
            errors.append(f"{type(e).__name__}: {e}")
    return {"errors": errors}
