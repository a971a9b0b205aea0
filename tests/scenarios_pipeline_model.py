"""The pipeline-parallel Llama on real DeepSpeed PipelineEngines (CPU, gloo), run by tests/mp.py: one pipeline
stage per rank, against the plain HF model trained by torch on the same batches."""

from __future__ import annotations

import copy
import os

import deepspeed
import torch
from transformers import LlamaForCausalLM

from aim_ds.experiment.modeling import tiny_llama_config
from aim_ds.experiment.pipeline import PIPE_CONFIG, build_pipeline_model, gather_hf_state_dict

VOCAB = 97
ROWS = 2
LR = 0.5  # plain SGD: a step is -LR x the gradient, so a missing gradient (one side of the tie) shows
GAS = 2
# one step's micro-batches: two sequence lengths (the driver's batches vary), the second right-padded
TRAIN = [(11, 12, 0), (12, 8, 3)]  # (seed, length, pad)
EVAL = [(21, 10, 4), (22, 6, 0)]


def config(tied: bool, attn: str = "sdpa"):
    cfg = tiny_llama_config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=tied
    )
    cfg._attn_implementation = attn
    return cfg


def batch(seed: int, length: int, pad: int = 0):
    """(input_ids, labels, attention_mask); pad > 0: the last row right-padded (id 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (ROWS, length), generator=g)
    labels, mask = ids.clone(), torch.ones_like(ids)
    if pad:
        ids[-1, -pad:], labels[-1, -pad:], mask[-1, -pad:] = 0, -100, 0
    return ids, labels, mask


def _hf_loss(model, seed, length, pad) -> float:
    ids, labels, mask = batch(seed, length, pad)
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels, attention_mask=mask).loss)


def _pipe_loss(engine, seed, length, pad) -> float:
    ids, labels, _ = batch(seed, length, pad)
    return float(engine.eval_batch(iter([(ids, labels)]), num_micro_batches=1))


def _max_abs(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


def pipeline_checks(out: str, attn: str = "sdpa", tp: int = 1) -> dict:
    """Per tie setting, at as many stages as ranks: the pipeline's eval losses against the HF model's (right
    padding and two lengths), one train_batch of GAS micro-batches against one torch SGD step of the HF model
    on them, gather_hf_state_dict against that model's weights; then save_checkpoint under OUT/STAGES-TIED and
    the gathered dict to OUT/STAGES-TIED.pt (rank 0) for the offline join."""
    stages = deepspeed.comm.get_world_size() // tp  # tp > 1: Megatron-style tensor parallelism in each stage
    rank = deepspeed.comm.get_rank()
    res = {}
    for tied in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config(tied, attn))
        ref = copy.deepcopy(model)  # the pipeline shares (and trains) the model's own tensors
        pipe = build_pipeline_model(model, stages, tensor_parallel=tp)
        ds = {
            "train_micro_batch_size_per_gpu": ROWS,
            "gradient_accumulation_steps": GAS,
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
            "zero_optimization": {"stage": 1},
            "zero_allow_untested_optimizer": True,
            # activations whole between stages: DeepSpeed caches a partitioned activation's shape, and the
            # batches here vary in length (aim_ds.experiment.pipeline.PIPE_CONFIG)
            "pipeline": PIPE_CONFIG,
        }
        opt = torch.optim.SGD([p for p in pipe.parameters() if p.requires_grad], lr=LR)
        engine, *_ = deepspeed.initialize(model=pipe, optimizer=opt, config=ds)
        r = {
            "parts": [int(x) for x in pipe.parts],
            "local": sorted(pipe.state_dict()),
            "eval": [(_pipe_loss(engine, *b), _hf_loss(ref, *b)) for b in EVAL],
        }
        before = gather_hf_state_dict(engine)
        r["initial_diff"] = _max_abs(before, ref.state_dict())
        r["keys"] = sorted(before) == sorted(ref.state_dict())

        batches = [batch(*b)[:2] for b in TRAIN]
        r["train_loss"] = float(engine.train_batch(iter(batches)))
        ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
        loss = sum(ref(input_ids=i, labels=lab).loss for i, lab in batches) / len(batches)
        loss.backward()
        ref_opt.step()
        r["ref_train_loss"] = float(loss)
        after = gather_hf_state_dict(engine)
        r["step_diff"] = _max_abs(after, ref.state_dict())
        r["step_size"] = _max_abs(after, before)
        if tied:
            r["head_is_embedding"] = after["lm_head.weight"] is after["model.embed_tokens.weight"]
        r["eval_after"] = [(_pipe_loss(engine, *b), _hf_loss(ref, *b)) for b in EVAL]

        name = f"{stages if tp == 1 else f'{stages}x{tp}'}-{'tied' if tied else 'untied'}"
        engine.save_checkpoint(os.path.join(out, name), tag="step1")
        if rank == 0:
            torch.save(after, os.path.join(out, f"{name}.pt"))
        deepspeed.comm.barrier()
        res["tied" if tied else "untied"] = r
    return res
