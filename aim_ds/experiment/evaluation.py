"""Scoring a model on a task (exact match by label ranking, ROUGE-L by greedy generation) and the
continual-learning metrics OP / BWT / FWT.

Multi-rank: every rank calls :func:`evaluate_task` with the same task; rank r scores examples
r, r+W, r+2W, ... and the (sum, count) pairs are all-reduced. Under ZeRO-3 every forward is a
collective, so all ranks run the same number of batches: a rank with fewer examples repeats one
and drops its score.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from ..data.dataset import encode_prompt, encode_target
from ..data.tasks import Task
from ..shards.tp import vocab_head, whole_vocab_logits


def _normalise(s: str) -> str:
    return s.strip().lower()


def _unwrap(model_or_engine):
    """(callable for forward, module with .generate, device)."""
    module = getattr(model_or_engine, "module", model_or_engine)
    device = getattr(model_or_engine, "device", None)
    if not isinstance(device, torch.device):
        try:
            device = next(module.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    return model_or_engine, module, device


def keeps_logits(model_or_engine) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do, also under peft's
    causal-LM wrapper, which hands it on: see memory.input_consumer)."""
    from ..plugin.memory import input_consumer

    module = getattr(model_or_engine, "module", model_or_engine)
    try:
        return "logits_to_keep" in inspect.signature(input_consumer(module).forward).parameters
    except (TypeError, ValueError):
        return False


def _n_batches(n_items_for_rank, world_size: int, batch_size: int) -> int:
    return max(math.ceil(n_items_for_rank(r) / batch_size) for r in range(world_size))


def _rank_slice(n: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, n, world_size))


def _pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_labels(
    model_or_engine,
    tokenizer,
    prompts: list[list[int]],
    label_ids: list[list[int]],
    batch_size: int,
    n_batches: int | None = None,
) -> torch.Tensor:
    """Summed log-likelihood of every label continuation after every prompt: [n_prompts, n_labels].

    Pairs are scored in batches of ``batch_size`` sequences; ``n_batches`` (>= needed) forces
    extra dummy forwards so that all ranks run the same number (ZeRO-3)."""
    fwd, _, device = _unwrap(model_or_engine)
    pairs = [(p, l) for p in range(len(prompts)) for l in range(len(label_ids))]
    need = math.ceil(len(pairs) / batch_size)
    n_batches = need if n_batches is None else n_batches
    scores = torch.zeros(len(prompts) * len(label_ids), dtype=torch.float64)
    dummy = [(prompts[0] if prompts else [tokenizer.bos_token_id]) + label_ids[0]]
    for b in range(n_batches):
        chunk = pairs[b * batch_size : (b + 1) * batch_size]
        if not chunk:
            ids, mask = _pad_right(dummy, tokenizer.pad_token_id, device)
            fwd(input_ids=ids, attention_mask=mask)
            continue
        seqs = [prompts[p] + label_ids[l] for p, l in chunk]
        ids, mask = _pad_right(seqs, tokenizer.pad_token_id, device)
        if not keeps_logits(fwd):
            logits = whole_vocab_logits(fwd, fwd(input_ids=ids, attention_mask=mask).logits).float()
            tok_lp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for i, (p, l) in enumerate(chunk):
                start, end = len(prompts[p]) - 1, len(prompts[p]) + len(label_ids[l]) - 1
                scores[b * batch_size + i] = tok_lp[i, start:end].sum().double().cpu()
            continue
        # logits only where they score a label token (the LM head dominates a small model's forward)
        width = max(len(label_ids[l]) for _, l in chunk)
        start = torch.tensor([len(prompts[p]) - 1 for p, _ in chunk], device=ids.device)
        pos = (start[:, None] + torch.arange(width, device=ids.device)[None, :]).clamp(max=ids.shape[1] - 2)
        logits = whole_vocab_logits(fwd, fwd(input_ids=ids, attention_mask=mask, logits_to_keep=pos).logits).float()
        tok_lp = F.log_softmax(logits, dim=-1).gather(-1, ids.gather(1, pos + 1).unsqueeze(-1)).squeeze(-1)
        for i, (_, l) in enumerate(chunk):
            scores[b * batch_size + i] = tok_lp[i, : len(label_ids[l])].sum().double().cpu()
    return scores.view(len(prompts), len(label_ids))


@torch.no_grad()
def generate_texts(
    model_or_engine,
    tokenizer,
    prompts: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
    n_batches: int | None = None,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy continuations (left-padded batches), decoded and cut at eos."""
    _, module, device = _unwrap(model_or_engine)
    head = vocab_head(module)
    # generate() reads the head's output directly: gather a vocabulary-sliced AutoTP head's slices meanwhile
    hook = head.register_forward_hook(lambda m, a, out: whole_vocab_logits(module, out)) if head else None
    try:
        return _generate(module, tokenizer, prompts, batch_size, max_new_tokens, n_batches, synced_gpus, device)
    finally:
        if hook is not None:
            hook.remove()


def _generate(module, tokenizer, prompts, batch_size, max_new_tokens, n_batches, synced_gpus, device) -> list[str]:
    need = math.ceil(len(prompts) / batch_size)
    n_batches = need if n_batches is None else n_batches
    out: list[str] = []
    for b in range(n_batches):
        chunk = prompts[b * batch_size : (b + 1) * batch_size]
        real = len(chunk)
        if not chunk:
            chunk = [prompts[0] if prompts else [tokenizer.bos_token_id]]
        n = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), n), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, n - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, n - len(s) :] = 1
        gen = module.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced_gpus,
        )
        for i in range(real):
            new = gen[i, n:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1] of lower-cased, stripped strings (rouge-score package)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    p, r = _normalise(prediction), _normalise(reference)
    if not p or not r:
        return float(p == r)
    return _ROUGE.score(r, p)["rougeL"].fmeasure


def _all_reduce_sum_count(total: float, count: int, device, world_size: int) -> tuple[float, float]:
    import torch.distributed as dist

    if world_size > 1:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"evaluate_task: world_size={world_size} but torch.distributed is not initialised")
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t[0].item(), t[1].item()
    return total, count


def evaluate_task(
    model_or_engine,
    tokenizer,
    task: Task,
    *,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    max_new_tokens: int = 32,
    max_prompt_len: int = 160,
    synced_gpus: bool | None = None,
) -> float:
    """Score ``task.eval`` in percent (0-100); every rank must call it.

    Classification (``task.labels`` set): the label with the highest summed log-likelihood of
    " label<eos>" after the prompt is the prediction; exact match (lower-cased, stripped).
    Otherwise: greedy generation of up to ``max_new_tokens``; ROUGE-L F1 (metric "rougeL") or exact
    match (metric "exact"). ``batch_size`` counts sequences per forward (prompt x label pairs for
    classification). ``synced_gpus`` defaults to world_size > 1 (required under ZeRO-3).
    The model is put in eval mode and its previous mode restored.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    fwd, module, device = _unwrap(model_or_engine)
    was_training = module.training
    model_or_engine.eval()
    try:
        n = len(task.eval)
        mine = [task.eval[i] for i in _rank_slice(n, rank, world_size)]
        prompts = [encode_prompt(tokenizer, e.input, max_prompt_len) for e in mine]
        total = 0.0
        if task.labels is not None:
            labels = list(task.labels)
            label_ids = [encode_target(tokenizer, l) for l in labels]
            nb = _n_batches(lambda r: len(_rank_slice(n, r, world_size)) * len(labels), world_size, batch_size)
            scores = score_labels(model_or_engine, tokenizer, prompts, label_ids, batch_size, nb)
            for e, row in zip(mine, scores):
                pred = labels[int(torch.argmax(row))]
                total += float(_normalise(pred) == _normalise(e.output))
        else:
            nb = _n_batches(lambda r: len(_rank_slice(n, r, world_size)), world_size, batch_size)
            sync = (world_size > 1) if synced_gpus is None else synced_gpus
            preds = generate_texts(model_or_engine, tokenizer, prompts, batch_size, max_new_tokens, nb, sync)
            for e, p in zip(mine, preds):
                if task.metric == "rougeL":
                    total += rouge_l(p, e.output)
                else:
                    total += float(_normalise(p) == _normalise(e.output))
        total, count = _all_reduce_sum_count(total, len(mine), device, world_size)
    finally:
        model_or_engine.train(was_training)
    return 100.0 * total / count if count else 0.0


def cl_metrics(matrix: list[list[float]], single: list[float] | None = None) -> dict:
    """OP, BWT, FWT (percent) from a[k][i] = score on task i after training task k (K x K; entries
    above the diagonal are ignored). OP = mean_i a[K][i]; BWT = mean_{i<K} (a[K][i] - a[i][i])
    (0.0 when K = 1); FWT = mean_i (a[i][i] - single[i]), None without ``single``."""
    K = len(matrix)
    if K == 0:
        raise ValueError("cl_metrics: empty matrix")
    for k, row in enumerate(matrix):
        if len(row) < k + 1:
            raise ValueError(f"cl_metrics: row {k} has {len(row)} entries, needs at least {k + 1}")
    last = matrix[K - 1]
    op = sum(last[:K]) / K
    bwt = sum(last[i] - matrix[i][i] for i in range(K - 1)) / (K - 1) if K > 1 else 0.0
    fwt = None
    if single is not None:
        if len(single) != K:
            raise ValueError(f"cl_metrics: single has {len(single)} entries, expected {K}")
        fwt = sum(matrix[i][i] - single[i] for i in range(K)) / K
    return {"OP": op, "BWT": bwt, "FWT": fwt}
