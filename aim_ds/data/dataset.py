"""Causal-LM encoding of examples: prompt + " " + output + eos, loss on the output only."""

from __future__ import annotations

import torch

from .tasks import Example

IGNORE = -100


def encode_prompt(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """bos + prompt ids. Over max_tokens: keep the first line (instruction + options) and the
    last tokens (the end of the input and "Answer:"). The first line is encoded on its own, so
    truncated and untruncated prompts tokenize identically."""
    head_text, sep, rest = text.partition("\n")
    head = [tokenizer.bos_token_id] + tokenizer.encode(head_text + sep, add_special_tokens=False)
    tail = tokenizer.encode(rest, add_special_tokens=False) if rest else []
    ids = head + tail
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    head = head[: max(1, max_tokens // 2)]
    keep = max_tokens - len(head)
    return head + (tail[-keep:] if keep > 0 else [])


def encode_target(tokenizer, output: str) -> list[int]:
    """ids of " output" + eos (the scored/learned part)."""
    return tokenizer.encode(" " + output, add_special_tokens=False) + [tokenizer.eos_token_id]


def encode_example(tokenizer, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    target = encode_target(tokenizer, ex.output)
    if len(target) > max_len // 2 and len(target) + 8 > max_len:
        target = target[: max(1, max_len // 2 - 1)] + [tokenizer.eos_token_id]
    prompt = encode_prompt(tokenizer, ex.input, max_len - len(target))
    ids = prompt + target
    labels = [IGNORE] * len(prompt) + target
    return ids, labels


class CausalLMExamples(torch.utils.data.Dataset):
    """Items are dicts of 1-D LongTensors ``input_ids`` and ``labels`` (-100 on the prompt)."""

    def __init__(self, examples: list[Example], tokenizer, max_len: int = 160):
        self.examples = list(examples)
        self.items = []
        for ex in self.examples:
            ids, labels = encode_example(tokenizer, ex, max_len)
            self.items.append(
                {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(batch: list[dict], pad_id: int, label_logits_only: bool = True) -> dict:
    """Right-pad to the longest item: input_ids (pad_id), attention_mask (0 on pad), labels (-100).

    With ``label_logits_only`` (default) the batch also carries ``logits_to_keep``: per row, the
    positions from the one before the first label token to the last label token, so the LM head runs on
    those few positions instead of all of them (it is most of the compute of a small model with a big
    vocabulary). ``labels`` is then gathered at the same positions; the model's causal-LM loss, which
    shifts labels by one inside the kept window, is the same mean over the same label tokens."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = b["input_ids"]
        mask[i, :k] = 1
        labels[i, :k] = b["labels"] if "labels" in b else b["input_ids"]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if label_logits_only:
        out["logits_to_keep"], out["labels"] = label_window(labels)
    return out


def label_window(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, W], labels gathered there [B, W]) covering every row's label span plus the
    position before it (whose logits predict the first label token); padded windows get -100."""
    b, n = labels.shape
    has = labels != IGNORE
    pos = torch.arange(n).expand(b, n)
    first = torch.where(has, pos, n).min(dim=1).values
    last = torch.where(has, pos, -1).max(dim=1).values
    start = (first - 1).clamp(min=0)
    start = torch.where(last >= 0, start, torch.zeros_like(start))
    span = torch.where(last >= 0, last - start + 1, torch.ones_like(start))
    w = int(span.max())
    window = start[:, None] + torch.arange(w)[None, :]
    inside = window <= (start + span - 1)[:, None]
    window = window.clamp(max=n - 1)
    kept = torch.where(inside, labels.gather(1, window), torch.full_like(window, IGNORE))
    return window, kept
