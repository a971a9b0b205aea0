"""A byte-level BPE tokenizer trained locally on the tasks' texts, cached on disk."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .tasks import Task

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
_FORMAT = "aim_ds-bytebpe-v1"


def tokenizer_texts(tasks: list[Task]) -> list[str]:
    """The texts the tokenizer is trained on: every train input and output, in task order."""
    texts = []
    for t in tasks:
        for e in t.train:
            texts.append(e.input)
            texts.append(" " + e.output)
    return texts


def _key(texts: list[str], vocab_size: int) -> str:
    h = hashlib.sha256(f"{_FORMAT}\0{vocab_size}\0".encode())
    for s in texts:
        h.update(s.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:20]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="right"
    )


def get_tokenizer(tasks: list[Task], cache_dir: str, vocab_size: int = 8000):
    """Byte-level BPE (vocab_size incl. 3 specials + 256 bytes) trained on the tasks' train texts.

    Cached under ``cache_dir/tokenizer-<hash of texts and vocab size>``; written to a temp dir and
    renamed, so concurrent ranks never see a half-written tokenizer. Same texts -> same tokenizer.
    ``len(tokenizer)`` is the embedding size the model needs.
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise ValueError(f"vocab_size must be >= 260 (256 bytes + 3 special tokens), got {vocab_size}")
    texts = tokenizer_texts(tasks)
    final = Path(cache_dir) / f"tokenizer-{_key(texts, vocab_size)}"
    if not (final / "tokenizer.json").is_file():
        tok = train_tokenizer(texts, vocab_size)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=final.parent))
        try:
            tok.save_pretrained(str(tmp))
            try:
                os.rename(tmp, final)
            except OSError:  # another process won the race: its copy is identical
                if not (final / "tokenizer.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    tok = PreTrainedTokenizerFast.from_pretrained(str(final))
    tok.padding_side = "right"
    return tok
