"""Exports of checkpoints to the formats other tools load. Imports checkpoints/ and recursive_model/, never pipelines/
or serve/.

    hf.py         `rnc export hf`: a Hugging Face transformers directory (remote code + fast tokenizer)
    hf_remote/    the configuration and modeling files that directory ships (torch + transformers only)
"""

from .hf import add_export_subcommand, export_hf

__all__ = ["add_export_subcommand", "export_hf"]
