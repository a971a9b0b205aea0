"""Calibrate the generated default benchmark without DeepSpeed: one process, plain PyTorch.

Trains a tiny LlamaForCausalLM on the default tasks one after another (seqft) and with mixed
replay (each earlier task's memory buffer, select_memory(fraction), mixed into the current task's
training data) and, with --methods merge, a fixed-interval AimMerging stand-in (every S steps:
S rehearsal steps on memory batches, then theta = anchor + w_in*delta_in + w_out*delta_out), printing the accuracy matrix a[k][i] and OP / BWT.

    OMP_NUM_THREADS=1 python benchmarks/calibrate_default.py [--steps 80] [--methods seqft,replay,merge] ...
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch


def build_model(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaForCausalLM

    from aim_ds.experiment.modeling import tiny_llama_config

    torch.manual_seed(seed)
    cfg = tiny_llama_config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def run(method: str, args, tasks, tok) -> list[list[float]]:
    from aim_ds.data import CausalLMExamples, collate, select_memory
    from aim_ds.experiment.evaluation import evaluate_task

    model = build_model(len(tok), args.hidden, args.layers, args.seed)
    memory = []
    matrix = []
    rng = random.Random(args.seed)
    for k, task in enumerate(tasks):
        examples = list(task.train) + (memory if method == "replay" else [])
        ds = CausalLMExamples(examples, tok, max_len=64)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
        model.train()
        order: list[int] = []
        mem_ds = CausalLMExamples(memory, tok, max_len=64) if memory else None
        anchor = [p.detach().clone() for p in model.parameters()]
        for step in range(args.steps):
            if len(order) < args.batch_size:
                perm = list(range(len(ds)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[: args.batch_size], order[args.batch_size :]
            batch = collate([ds[i] for i in idx], tok.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if method == "merge" and mem_ds is not None and (step + 1) % args.interval == 0:
                # the simplest AimMerging: fixed interval S, R = S rehearsal steps on memory
                # batches (LR schedule not advanced), fixed weights, fused theta -> new anchor
                theta_k = [p.detach().clone() for p in model.parameters()]
                for _ in range(args.interval):
                    idx = [rng.randrange(len(mem_ds)) for _ in range(args.batch_size)]
                    model(**collate([mem_ds[i] for i in idx], tok.pad_token_id)).loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for p, a, k in zip(model.parameters(), anchor, theta_k):
                        p.copy_(a + args.w_in * (k - a) + args.w_out * (p - k))
                anchor = [p.detach().clone() for p in model.parameters()]
        row = [evaluate_task(model, tok, t, batch_size=64) for t in tasks]
        matrix.append(row)
        print(
            f"  {method} after {task.name:8s} (loss {loss.item():.3f}): " + " ".join(f"{x:5.1f}" for x in row),
            flush=True,
        )
        memory += select_memory(task, args.memory, args.seed)
    return matrix


def main(argv=None):
    from aim_ds.data import get_tokenizer, load_tasks
    from aim_ds.experiment.evaluation import cl_metrics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="seqft,replay,merge")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per task (2 epochs of 640)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--memory", type=float, default=0.02)
    p.add_argument("--interval", type=int, default=8, help="merge: fixed interval S (= rehearsal steps)")
    p.add_argument("--w_in", type=float, default=0.5)
    p.add_argument("--w_out", type=float, default=0.5)
    p.add_argument("--max_train", type=int, default=None)
    p.add_argument("--max_eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_words", type=int, default=None, help="override the default input length")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.n_words is None:
        tasks = load_tasks("default", max_train=args.max_train, max_eval=args.max_eval, seed=args.seed)
    else:
        from aim_ds.data import generate_default_tasks, make_task

        tasks = [
            make_task(
                t.name, t.train, t.eval, t.metric, max_train=args.max_train, max_eval=args.max_eval, seed=args.seed
            )
            for t in generate_default_tasks(n_words=args.n_words)
        ]
    tok = get_tokenizer(tasks, tempfile.gettempdir() + "/aim_ds_tokenizers", vocab_size=512)
    results = {}
    for method in args.methods.split(","):
        t0 = time.time()
        m = run(method, args, tasks, tok)
        met = cl_metrics(m, None)
        results[method] = {"matrix": m, **met, "seconds": round(time.time() - t0, 1)}
        print(f"{method}: OP {met['OP']:.1f} BWT {met['BWT']:.1f} ({time.time() - t0:.0f} s)", flush=True)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
