"""Recursive (recurrent-depth) GPT in the nanochat style: pure PyTorch, no Ray inside."""

from .batching import ContinuousEngine, SamplingParams
from .config import PRESETS, GPTConfig
from .engine import Engine, GenerationResult, TokenStep
from .model import GPT, parameter_counts
from .recurrence import EXIT_CRITERIA, DecodeSettings, ExitRule, RecurrenceSampling
from .sampling import recur_generator, sample_num_recur
from .tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = [
    "GPT", "GPTConfig", "PRESETS", "Engine", "GenerationResult", "TokenStep", "Tokenizer", "SPECIAL_TOKENS",
    "sample_num_recur", "recur_generator", "parameter_counts", "ContinuousEngine", "SamplingParams", "DecodeSettings",
    "ExitRule", "RecurrenceSampling", "EXIT_CRITERIA",
]
