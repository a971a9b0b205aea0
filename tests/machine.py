"""What this machine's DeepSpeed accelerator can run, asked of DeepSpeed itself (not of the CPU model), so a
case that needs a missing feature skips with the reason instead of failing."""

from __future__ import annotations

import functools

import pytest


@functools.cache
def fp16_supported() -> bool:
    # deepspeed.initialize refuses an fp16 config exactly when this is falsy (engine._do_sanity_check); the CPU
    # accelerator answers from oneDNN, true only on CPUs with AVX512-FP16 or AMX
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


FP16_REASON = (
    "DeepSpeed's accelerator reports no fp16 on this machine (get_accelerator().is_fp16_supported() is falsy, "
    "so deepspeed.initialize raises 'Type fp16 is not supported on your device'); the fp16 math that needs no "
    "engine is covered by tests/test_fp16_parts.py"
)

requires_fp16 = pytest.mark.skipif(not fp16_supported(), reason=FP16_REASON)


def split_by_fp16(cases, dtype_of):
    """(cases without fp16, fp16 cases): the second run only where fp16 engines can be built."""
    plain = [c for c in cases if dtype_of(c) != "fp16"]
    return plain, [c for c in cases if dtype_of(c) == "fp16"]
