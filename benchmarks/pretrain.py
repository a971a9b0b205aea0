#!/usr/bin/env python
"""Pretrain the benchmark model as a causal LM on unlabeled text, for runs that start from it (``--model DIR``).

    .venv/bin/python benchmarks/pretrain.py                         # -> runs/pretrained/<key>/, printed last
    .venv/bin/python launch/train.py --model runs/pretrained/<key> ...

The text is the INPUT field of the Long Sequence train splits (15 tasks) and nothing else: never an answer
(``output``), never a dev or test split, so no label of any benchmark leaks into the start. The tokenizer is
trained on the same inputs. Inputs are joined with the end-of-sequence token, packed into blocks and read in a
seeded order; 2% of the blocks are held out for the validation loss in ``pretrain.json``.

The folder is a Hugging Face model folder (``config.json``, ``model.safetensors``, tokenizer files) plus
``pretrain.json`` (settings, loss curve). Its name is a hash of the text, the model config and every setting, so
a second call with the same arguments returns the cached folder at once; it is written under a temporary name
and renamed, so a killed run leaves no folder that looks finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from aim_ds.data.core import ORDERS, read_examples  # noqa: E402

FORMAT = "aim_ds-pretrain-v1"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data-dir",
        default=str(ROOT.parent / "shared" / "data" / "longsequence"),
        help="O-LoRA data folder; only train/<task>_T5.json inputs are read",
    )
    p.add_argument("--model", default="configs/llama_2x256.json", help="model config JSON")
    p.add_argument("--out-root", default="runs/pretrained", help="the folder goes to OUT_ROOT/<key>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the packed training blocks")
    p.add_argument("--block", type=int, default=128, help="tokens per training row")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, 5%% warm-up, cosine)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    a = p.parse_args(argv)
    for name in ("epochs", "lr"):
        if getattr(a, name) <= 0:
            p.error(f"--{name} must be > 0")
    for name in ("block", "batch_size", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.vocab_size < 260:
        p.error("--vocab-size must be >= 260 (256 bytes + 3 special tokens)")
    return a


def unlabeled_texts(data_dir: str) -> list[str]:
    """The inputs of every Long Sequence train file, in order-1 task order."""
    texts = []
    for task in ORDERS[1]:
        texts += [e.input for e in read_examples(Path(data_dir) / "train" / f"{task}_T5.json", task)]
    return texts


def cache_key(texts: list[str], model_cfg: dict, a) -> str:
    h = hashlib.sha256(FORMAT.encode())
    settings = {k: getattr(a, k) for k in ("seed", "epochs", "block", "batch_size", "lr", "vocab_size")}
    h.update(json.dumps([model_cfg, settings], sort_keys=True).encode())
    for s in texts:
        h.update(s.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def pack(tokenizer, texts: list[str], block: int) -> list[list[int]]:
    stream = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aim_ds.data.tokenizer import train_tokenizer

    torch.set_num_threads(a.threads)
    texts = unlabeled_texts(a.data_dir)
    model_cfg = json.loads(Path(a.model).read_text())
    out = Path(a.out_root) / cache_key(texts, model_cfg, a)
    if (out / "pretrain.json").is_file():
        print(f"[pretrain] cached: {out}")
        print(out)
        return 0

    t0 = time.time()
    torch.manual_seed(a.seed)
    tok = train_tokenizer(texts, a.vocab_size)
    blocks = pack(tok, texts, a.block)
    random.Random(a.seed).shuffle(blocks)
    n_val = max(1, len(blocks) // 50)
    val, train = torch.tensor(blocks[:n_val]), torch.tensor(blocks[n_val:])

    cfg = {k: v for k, v in model_cfg.items() if k not in ("architectures", "transformers_version")}
    model_type = cfg.pop("model_type", "llama")
    cfg.update(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
    )
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.01)
    steps_per_epoch = len(train) // a.batch_size
    total = max(1, int(a.epochs * steps_per_epoch))
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    gen = torch.Generator().manual_seed(a.seed)
    print(
        f"[pretrain] {len(texts)} inputs -> {len(train)} train / {len(val)} held-out blocks of {a.block} tokens; "
        f"{total} steps of {a.batch_size}",
        flush=True,
    )

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [model(input_ids=b, labels=b).loss.item() for b in val.split(a.batch_size)]
        model.train()
        return sum(losses) / len(losses)

    curve = [{"step": 0, "val_loss": val_loss()}]
    order = torch.randperm(len(train), generator=gen)
    pos = 0
    model.train()
    for step in range(total):
        if pos + a.batch_size > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        batch = train[order[pos : pos + a.batch_size]]
        pos += a.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, total // 10) == 0 or step + 1 == total:
            curve.append({"step": step + 1, "train_loss": loss.item(), "val_loss": val_loss()})
            print(
                f"[pretrain] step {step + 1}/{total}  train {loss.item():.3f}  held-out {curve[-1]['val_loss']:.3f}  "
                f"{time.time() - t0:.0f} s",
                flush=True,
            )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        record = {
            "format": FORMAT,
            "settings": vars(a),
            "model_config": model_cfg,
            "inputs": len(texts),
            "train_blocks": len(train),
            "held_out_blocks": len(val),
            "steps": total,
            "wall_s": round(time.time() - t0, 1),
            "curve": curve,
            "text": "inputs of the Long Sequence train splits only (no outputs, no dev/test)",
        }
        (tmp / "pretrain.json").write_text(json.dumps(record, indent=1))
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"[pretrain] wrote {out} in {time.time() - t0:.0f} s")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
