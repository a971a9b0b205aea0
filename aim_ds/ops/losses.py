"""Loss utilities for causal-LM batches that mix new-task rows and memory rows.

The forgetting signal can be read from a training batch's own memory rows (``rows_loss``), and a mixed
batch can weight its memory rows however few they are (``mixed_loss``); both use one shifted
cross-entropy (``_token_losses``), the one the model's own loss uses.
"""

from __future__ import annotations

import torch

from ..errors import AimInputError


def batch_tokens(batch: dict) -> int:
    """Tokens a forward over this batch processes: the attention mask's ones, else every input id."""
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask):
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if torch.is_tensor(ids) else 0


def _token_losses(logits: torch.Tensor, labels: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [B, W-1] and label mask of a causal-LM batch: the shifted cross-entropy the model's own
    loss uses (position t predicts label t + 1; -100 ignored, loss 0 there)."""
    if logits.shape[:2] != labels.shape[:2]:
        raise AimInputError(
            f"{who}: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up; "
            "pass the labels at the positions whose logits the model returned."
        )
    lg, lb = _shifted(logits, labels)
    tok = torch.nn.functional.cross_entropy(lg, lb.reshape(-1), ignore_index=-100, reduction="none").view(lb.shape)
    return tok, lb != -100


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts label t + 1: the logits as [B * (W-1), vocab] in fp32 and the labels [B, W-1]."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    return lg.reshape(-1, lg.shape[-1]), lb


@torch.no_grad()
def rows_loss(logits: torch.Tensor, labels: torch.Tensor, rows) -> tuple[float, int]:
    """(summed token loss, label tokens) of some rows of a causal-LM batch, from the forward's own logits.
    ``labels`` are the ones passed to the model (with ``logits_to_keep`` positions, the labels gathered
    there, as aim_ds.data.collate makes them). For ``AimPlugin.record_probe_loss``."""
    tok, has = _token_losses(logits[rows], labels[rows], "rows_loss")
    return float(tok.sum()), int(has.sum())


def split_token_loss(logits: torch.Tensor, labels: torch.Tensor, n_new: int, who: str = "split_token_loss"):
    """(summed token loss, label tokens) of the first ``n_new`` rows and of the rest, as tensors (no host
    sync): the pieces from which the plain token-mean loss, the weighted mixed loss and the forgetting
    signal are all built, so the three count tokens alike."""
    tok, has = _token_losses(logits, labels, who)
    return tok[:n_new].sum(), has[:n_new].sum(), tok[n_new:].sum(), has[n_new:].sum()


def mixed_loss(
    logits: torch.Tensor, labels: torch.Tensor, n_new: int, memory_weight: float
) -> tuple[torch.Tensor, float, int]:
    """The training loss of a mixed batch whose first ``n_new`` rows are the new task's and the rest memory
    rows: (1 - w) x the new rows' mean token loss + w x the memory rows' mean token loss, w = memory_weight.
    The memory rows then pull with weight w however few they are (fewer rows = less compute, same expected
    gradient mix). Also returns the memory rows' (summed token loss, label tokens) for
    ``AimPlugin.record_probe_loss``, from the same cross-entropy (one pass over the logits). Labels as for
    ``rows_loss``."""
    if not (0.0 < memory_weight < 1.0):
        raise AimInputError(f"mixed_loss(memory_weight={memory_weight!r}): must be in (0, 1).")
    new_sum, new_n, mem_sum, mem_n = split_token_loss(logits, labels, n_new, "mixed_loss")
    # a side without label tokens contributes 0 (clamp: no 0/0); the counts stay tensors (no host sync) until here
    loss = (1.0 - memory_weight) * new_sum / new_n.clamp(min=1) + memory_weight * mem_sum / mem_n.clamp(min=1)
    return loss, float(mem_sum.detach()), int(mem_n)


__all__ = ["batch_tokens", "mixed_loss", "rows_loss", "split_token_loss"]
