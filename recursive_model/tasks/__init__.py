"""Chat tasks: generated training sets, hub eval loaders, sandboxed code execution, mixtures, ChatCORE, eval runners.

Everything here is plain Python except the eval runners (`run_categorical`, `run_generative`), which need torch.
"""

from __future__ import annotations

from recursive_model.tasks.base import Conversation, EvalType, Task, extract_final_answer, render_mc
from recursive_model.tasks.evaluate import run_categorical, run_generative
from recursive_model.tasks.execution import ExecutionResult, execute_program
from recursive_model.tasks.generated import Arithmetic, Identity, SpellingBee
from recursive_model.tasks.loaders import ARC, GSM8K, MMLU, HumanEval, SmolTalk, gsm8k_to_parts, load_rows
from recursive_model.tasks.mixture import MIXTURE_PRESETS, TASK_REGISTRY, TaskMixture, build_mixture, build_task
from recursive_model.tasks.reasoning import Reasoning
from recursive_model.tasks.scoring import EvalResult, centered_accuracy, chatcore

__all__ = [
    "ARC",
    "GSM8K",
    "MIXTURE_PRESETS",
    "MMLU",
    "TASK_REGISTRY",
    "Arithmetic",
    "Conversation",
    "EvalResult",
    "EvalType",
    "ExecutionResult",
    "HumanEval",
    "Identity",
    "Reasoning",
    "SmolTalk",
    "SpellingBee",
    "Task",
    "TaskMixture",
    "build_mixture",
    "build_task",
    "centered_accuracy",
    "chatcore",
    "execute_program",
    "extract_final_answer",
    "gsm8k_to_parts",
    "load_rows",
    "render_mc",
    "run_categorical",
    "run_generative",
]
