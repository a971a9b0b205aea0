"""The continual-learning driver behind launch/train.py, as a package.

args (the command line -> a frozen RunConfig), batching (LR schedule, the encoding cache; the data order is
aim_ds.data.batching), resume (checkpoint position, RNG and checks), trainer (CLTrainer and its methods),
results (results.json and plots), run (set-up and main)."""

from .args import METHODS, MIXING_METHODS, PLUGIN_METHODS, InputError, RunConfig, build_parser, parse_args
from .batching import EncodingCache, lr_at, memory_batches, rank_batches

__all__ = [
    "METHODS",
    "MIXING_METHODS",
    "PLUGIN_METHODS",
    "EncodingCache",
    "InputError",
    "RunConfig",
    "build_parser",
    "lr_at",
    "main",
    "memory_batches",
    "parse_args",
    "rank_batches",
]


def main(argv=None, t0: float | None = None) -> int:
    from .run import main as _main

    return _main(argv, t0)
