"""The rehearsal memory: input checks and the cursors that walk it (probe and rehearsal batches)."""

from __future__ import annotations

import inspect
import itertools

import torch

from ..errors import AimInputError


class Cursor:
    """Cycles through a list (resumable by position) or re-iterates an iterable."""

    def __init__(self, source, position: int = 0):
        self.source = source
        self.position = position
        self._it = None
        if not isinstance(source, (list, tuple)):
            self._it = iter(source)
            for _ in range(position):
                self._next_from_iterable()

    def _next_from_iterable(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.source)
            try:
                return next(self._it)
            except StopIteration:
                raise AimInputError("aim_merging: the memory iterable is empty; give at least one batch.") from None

    def next(self):
        if self._it is None:
            item = self.source[self.position % len(self.source)]
        else:
            item = self._next_from_iterable()
        self.position += 1
        return item


def check_memory(engine, memory, rank: int, pipe_batch=None) -> str | None:
    """The first problem with a rehearsal memory (one clear message naming the fix), or None. pipe_batch: a
    pipeline engine's conversion of a memory dict to its micro-batch (the model's forward names no inputs)."""
    if memory is None:
        return "aim_merging: memory is None; give a list or iterable of model-input dicts."
    if isinstance(memory, dict):
        return "aim_merging: memory is one dict; give a list (or iterable) of batch dicts."
    if isinstance(memory, (list, tuple)):
        batches = list(memory)
    else:
        try:
            it = iter(memory)
        except TypeError:
            return f"aim_merging: memory of type {type(memory).__name__} is not iterable; give a list of dicts."
        if it is memory:  # a generator or iterator: the checks, the probe and the rehearsal would drain one stream
            return (
                f"aim_merging: memory is a one-shot iterator ({type(memory).__name__}); the probe and the "
                "rehearsal each walk the memory again and again. Give a list (list(memory)) or a re-iterable "
                "object whose iter() starts afresh (a Dataset, a DataLoader)."
            )
        batches = list(itertools.islice(it, 1))
    if not batches:
        return (
            f"aim_merging: the rehearsal memory is empty on rank {rank}; every rank needs at least one batch "
            "(check the memory fraction and the number of ranks)."
        )
    module = input_consumer(engine.module)
    sig = inspect.signature(module.forward)
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    for i, b in enumerate(batches):
        where = f"aim_merging: memory batch {i}"
        if not isinstance(b, dict):
            return f"{where} is a {type(b).__name__}; each batch must be a dict of model inputs."
        if "labels" not in b:
            return f"{where} has no 'labels': the probe and rehearsal need a loss (add labels, -100 = ignore)."
        # a key the forward does not name would be swallowed by **kwargs (HF models) and ignored; a pipeline's
        # forward names none: pipe_batch picks the keys (tried below)
        unknown = [k for k in b if k not in sig.parameters] if pipe_batch is None else []
        if unknown:
            return (
                f"{where} has keys {unknown} that {type(module).__name__}.forward does not name"
                f"{' (it would silently ignore them via **kwargs)' if accepts_any else ''}; "
                "remove them or rename them to the model's input names."
            )
        labels, ids = b["labels"], b.get("input_ids")
        if not torch.is_tensor(labels) or labels.dtype not in (torch.int64, torch.int32):
            return f"{where}: labels must be an integer tensor (token ids, -100 = ignore)."
        keep = b.get("logits_to_keep")
        if torch.is_tensor(keep) and keep.dim() == 2:  # labels gathered at the kept logit positions
            if keep.shape != labels.shape:
                return (
                    f"{where}: labels shape {tuple(labels.shape)} differs from logits_to_keep "
                    f"{tuple(keep.shape)}; gather labels at the kept positions."
                )
        elif torch.is_tensor(ids) and ids.shape != labels.shape:
            return f"{where}: labels shape {tuple(labels.shape)} differs from input_ids {tuple(ids.shape)}."
        sizes = {k: v.shape[0] for k, v in b.items() if torch.is_tensor(v) and v.dim() > 0}
        if len(set(sizes.values())) > 1:
            return f"{where} mixes batch sizes {sizes}; all tensors must share the first dimension."
        if any(s == 0 for s in sizes.values()):
            return f"{where} has an empty tensor; every batch needs at least one row."
        if ids is not None:
            if not torch.is_tensor(ids) or ids.dtype not in (torch.int64, torch.int32):
                return f"{where}: input_ids must be an integer tensor."
            if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                return (
                    f"{where}: input_ids range [{int(ids.min())}, {int(ids.max())}] is outside the model's "
                    f"vocabulary [0, {vocab}); tokenize with the model's tokenizer."
                )
        if pipe_batch is not None:
            try:
                pipe_batch(b)
            except Exception as e:
                return (
                    f"{where}: pipe_batch could not turn it into a pipeline micro-batch ({type(e).__name__}: {e}); "
                    "give dicts with the keys your pipe_batch reads (the default reads input_ids and labels)."
                )
    return None


def to_device(batch: dict, device) -> dict:
    """A batch's tensors on the device (other values as they are)."""
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


__all__ = ["Cursor", "check_memory", "to_device"]


def _hands_kwargs_to_base(module, params) -> bool:
    """peft's task wrappers (PeftModelForCausalLM) name a few inputs and hand every other keyword, such as
    logits_to_keep, unchanged to the base model; prompt learning rewrites the inputs, so it is not followed."""
    cfg = getattr(module, "active_peft_config", None)
    return (
        callable(getattr(module, "get_base_model", None))
        and cfg is not None
        and not getattr(cfg, "is_prompt_learning", False)
        and any(p.kind == p.VAR_KEYWORD for p in params)
    )


def input_consumer(module):
    """The module whose forward names the model inputs: pass-through wrappers whose forward takes only
    (*args, **kwargs), such as peft's PeftModel without a task_type, and peft's task wrappers (see
    _hands_kwargs_to_base) are followed to the model they call."""
    for _ in range(8):
        params = list(inspect.signature(module.forward).parameters.values())
        named = any(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)
        if named and not _hands_kwargs_to_base(module, params):
            return module
        inner = module.get_base_model() if callable(getattr(module, "get_base_model", None)) else None
        for name in ("base_model", "model", "module"):
            if inner is None or inner is module:
                inner = getattr(module, name, None)
        if not isinstance(inner, torch.nn.Module) or inner is module:
            return module
        module = inner
    return module
