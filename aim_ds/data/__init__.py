"""Task sequences, benchmark loaders, the generated default benchmark, memory buffer, tokenizer."""

from .core import (
    BENCHMARK_ORDERS,
    ORDERS,
    load_olora_tasks,
    load_task_list,
    load_tasks,
    make_task,
    read_examples,
)
from .dataset import CausalLMExamples, collate, encode_example, encode_prompt, encode_target
from .default import generate_default_tasks, generate_generation_tasks
from .memory_selection import select_memory
from .tasks import DataError, Example, Task
from .tokenizer import get_tokenizer

__all__ = [
    "BENCHMARK_ORDERS",
    "ORDERS",
    "CausalLMExamples",
    "DataError",
    "Example",
    "Task",
    "collate",
    "encode_example",
    "encode_prompt",
    "encode_target",
    "generate_default_tasks",
    "generate_generation_tasks",
    "get_tokenizer",
    "load_olora_tasks",
    "load_task_list",
    "load_tasks",
    "make_task",
    "read_examples",
    "select_memory",
]
