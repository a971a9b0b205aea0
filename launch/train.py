#!/usr/bin/env python
"""Continual-learning driver: train a task sequence under DeepSpeed ZeRO-3, with or without AimMerging.

    deepspeed --num_gpus 2 launch/train.py                       # the embedded default (aim)
    deepspeed --num_gpus 2 launch/train.py --method seqft
    torchrun --nproc_per_node 2 launch/train.py ...
    mpirun -np 2 python launch/train.py ...
    python launch/train.py ...                                   # one process, world size 1
    deepspeed --hostfile H --master_addr HOST0 launch/train.py ...   # multi-node (ssh or --launcher mpich)

Every method shares the task order, the memory buffer (``--memory-fraction`` of each task's train set,
chosen by aim_ds.data.select_memory with the run's seed), the step budget and the evaluation:

  seqft        plain sequential fine-tuning
  replay       mixed replay: every training batch of task k >= 1 gets --replay-rows memory examples of tasks < k
  fixed_merge  the AimMerging plugin with interval_rule "fixed" and weight_policy "fixed" (the ds_config's
               w_in/w_out, default 0.5/0.5): merge every initial_interval steps; batches mixed as for replay
  aim          the plugin configured by the ds_config's "aim_merging" section (must be enabled), on top of
               the same mixed batches as replay (--replay-rows 0: the paper's AimMerging alone, memory used
               only by the probe and the rehearsal). With probe_source "training_batch" the forgetting
               signal is the loss of the batch's memory rows (aim_ds.rows_loss), so no probe forward runs
  single       each task trained alone from the initial model (the FWT reference s[i]); also fills the
               FWT reference cache
  multitask    all tasks' training sets jointly (the same total number of steps)

A non-aim method ignores an enabled "aim_merging" section (the driver does not attach the plugin);
results.json records it.  A fresh torch AdamW state at every task start; the learning rate follows a
per-task linear warm-up (6%) and cosine decay set by the driver (no DeepSpeed scheduler).

Checkpoints: ``--checkpoint-every N`` saves under <output-dir>/checkpoints every N driver steps and at every task
boundary; ``--resume auto|DIR`` continues a killed run to exactly the uninterrupted result (launch/README.md).
"""

from __future__ import annotations

import os
import sys
import time

_T0 = time.time()  # wall_time_s counts the imports too
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import warnings  # noqa: E402

# DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates: one FutureWarning per step.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
warnings.filterwarnings("ignore", message=r".*is deprecated. Please use .*", category=FutureWarning)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(_REPO, ".cache", "torch_extensions"))

if __name__ == "__main__":
    from aim_ds.driver import main

    sys.exit(main(t0=_T0))
