"""Recursive (recurrent-depth) GPT in the nanochat style: pure PyTorch, no Ray inside."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from .config import PRESETS, GPTConfig
from .engine import Engine, GenerationResult, TokenStep
from .model import GPT, parameter_counts
from .sampling import recur_generator, sample_num_recur
from .tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = [
    "GPT", "GPTConfig", "PRESETS", "Engine", "GenerationResult", "TokenStep", "Tokenizer", "SPECIAL_TOKENS",
    "sample_num_recur", "recur_generator", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
    "CheckpointError", "parameter_counts",
]
