"""`rnc export hf`: a checkpoint as a Hugging Face transformers model directory.

The directory loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR)` on a machine without this project:

    config.json                      RecursiveGPTConfig fields + auto_map to the two python files below
    configuration_recursive_gpt.py   the config class (transformers only)
    modeling_recursive_gpt.py        the model: forward(num_recur=...), generate() with an exact-layout KV cache
    model.safetensors                the checkpoint's weights under the same names
    generation_config.json           stops at <|assistant_end|> or <|bos|>, like Engine
    tokenizer.json                   HF fast tokenizer: the same byte-level BPE, split pattern and special tokens
    tokenizer_config.json            special tokens and the chat template of Tokenizer.render_conversation
    README.md                        model card

Writing needs no transformers: every file is plain JSON, text or safetensors. Fixed-r decoding only: the exported
model knows no adaptive exit, warm start or ring KV cache, and refuses state_init='noise'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from checkpoints import INFERENCE_PARTS, fetch_checkpoint, load_checkpoint
from recursive_model.config import GPTConfig
from recursive_model.tokenizer import SPECIAL_TOKENS, Tokenizer

REMOTE_CODE_DIR = Path(__file__).parent / "hf_remote"
CONFIG_MODULE, MODEL_MODULE = "configuration_recursive_gpt", "modeling_recursive_gpt"
EXPORT_FILES = (
    "config.json",
    f"{CONFIG_MODULE}.py",
    f"{MODEL_MODULE}.py",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
)
ROPE_THETA = 10000.0  # recursive_model.model.GPT._rotary_table's base
EXPORTABLE_STATE_INITS = ("embed", "zeros")

# Tokenizer.render_conversation as a jinja chat template: <|bos|>, a leading system message merged into the first user
# message, alternating user/assistant turns, assistant content as a string or as text / python / python_output parts.
# `add_generation_prompt` primes <|assistant_start|> (render_for_completion).
CHAT_TEMPLATE = "".join(
    [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- if messages | length < 2 or messages[1]['role'] != 'user' -%}",
        "{{ raise_exception('a system message must be followed by a user message') }}",
        "{%- endif -%}",
        "{%- set turns = [{'role': 'user', 'content': messages[0]['content'] ~ '\\n\\n' ~ messages[1]['content']}]"
        " + messages[2:] -%}",
        "{%- else -%}{%- set turns = messages -%}{%- endif -%}",
        "<|bos|>",
        "{%- for m in turns -%}",
        "{%- if m['role'] != ['user', 'assistant'][loop.index0 % 2] -%}",
        "{{ raise_exception('turns must alternate user/assistant, starting with user') }}",
        "{%- endif -%}",
        "{%- if m['role'] == 'user' -%}<|user_start|>{{ m['content'] }}<|user_end|>",
        "{%- else -%}<|assistant_start|>",
        "{%- if m['content'] is string -%}{{ m['content'] }}",
        "{%- else -%}{%- for part in m['content'] -%}",
        "{%- if part['type'] == 'python' -%}<|python_start|>{{ part['text'] }}<|python_end|>",
        "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{ part['text'] }}<|output_end|>",
        "{%- else -%}{{ part['text'] }}{%- endif -%}",
        "{%- endfor -%}{%- endif -%}",
        "<|assistant_end|>",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}",
    ]
)


# ---------------------------------------------------------------------------------------------------- tokenizer
def _byte_alphabet() -> list[str]:
    """The printable character standing for each byte in byte-level BPE vocabularies (GPT-2's mapping).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, 0x7F-0xA0, 0xAD) take the code points
    from 256 up, in byte order.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, spare = [], 256
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(spare))
            spare += 1
    return alphabet


def hf_tokenizer_json(tokenizer: Tokenizer) -> dict:
    """tokenizer.json of an HF fast tokenizer that encodes like `tokenizer` (tiktoken).

    tiktoken returns a split piece that is itself a token as that token, and otherwise merges, among adjacent parts,
    the pair whose concatenation has the lowest rank. `ignore_merges` gives the first; listing *every* split of each
    token into two tokens as a merge, ordered by the token's rank, gives the second. Special-token strings in text
    become special ids (the chat template needs that); `split_special_tokens=True` encodes them as text instead,
    as Tokenizer.encode does.
    """
    alphabet = _byte_alphabet()
    n_ranks = tokenizer.vocab_size - len(SPECIAL_TOKENS)
    pieces = [tokenizer.id_to_token(i) for i in range(n_ranks)]
    rank = {piece: i for i, piece in enumerate(pieces)}
    as_text = ["".join(alphabet[b] for b in piece) for piece in pieces]
    merges = [
        f"{as_text[rank[piece[:k]]]} {as_text[rank[piece[k:]]]}"  # byte-level text never holds a space
        for piece in pieces
        for k in range(1, len(piece))
        if piece[:k] in rank and piece[k:] in rank
    ]
    specials = tokenizer.special_tokens
    bos = "<|bos|>"
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": specials[name],
                "content": name,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for name in SPECIAL_TOKENS
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        # add_special_tokens=True (the HF default) prepends <|bos|>, as every training document starts with it.
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [specials[bos]], "tokens": [bos]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {text: i for i, text in enumerate(as_text)},
            "merges": merges,
        },
    }


def _special_token_roles(tokenizer: Tokenizer) -> dict[str, int]:
    """bos, eos (the chat turn end) and pad (= eos: no spare id; generate masks padding by attention_mask)."""
    end = tokenizer.encode_special("<|assistant_end|>")
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": end, "pad_token_id": end}


def hf_tokenizer_config(tokenizer: Tokenizer, max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|assistant_end|>",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }


# -------------------------------------------------------------------------------------------------------- model
def hf_model_config(config: GPTConfig, tokenizer: Tokenizer, dtype: str) -> dict:
    """config.json: the architecture, (P, R, C), inject_mode, state_init, softcap, the attention window and the default
    num_recur."""
    if config.state_init not in EXPORTABLE_STATE_INITS:
        raise ValueError(
            f"GPTConfig.state_init={config.state_init!r} cannot be exported; allowed {EXPORTABLE_STATE_INITS}: "
            f"'noise' draws s0 from a generator seeded per sequence by the Engine, which generate() cannot reproduce"
        )
    if config.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"GPTConfig.vocab_size={config.vocab_size} differs from the tokenizer's "
            f"vocab_size={tokenizer.vocab_size}; the export needs one vocabulary"
        )
    return {
        "architectures": ["RecursiveGPTForCausalLM"],
        "model_type": "recursive_gpt",
        "auto_map": {
            "AutoConfig": f"{CONFIG_MODULE}.RecursiveGPTConfig",
            "AutoModelForCausalLM": f"{MODEL_MODULE}.RecursiveGPTForCausalLM",
        },
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.sequence_len,
        "hidden_size": config.n_embd,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "n_prelude": config.n_prelude,
        "n_recur": config.n_recur,
        "n_coda": config.n_coda,
        "num_recur": config.decode.num_recur,
        "inject_mode": config.inject_mode,
        "state_init": config.state_init,
        "softcap": config.softcap,
        "sliding_window": config.attn_window,
        "coda_window": config.windows[2],
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        **_special_token_roles(tokenizer),
    }


def _generation_config(tokenizer: Tokenizer) -> dict:
    roles = _special_token_roles(tokenizer)
    return {**roles, "eos_token_id": [roles["eos_token_id"], tokenizer.bos_token_id]}  # Engine's two stop ids


def _model_card(source: str, config: GPTConfig, meta: dict) -> str:
    where = ", ".join(f"{k} {meta[k]}" for k in ("stage", "step") if k in meta)
    return f"""---
library_name: transformers
tags: [recursive-gpt, recurrent-depth]
---
# Recursive GPT

Exported from the rnc checkpoint `{source}`{f" ({where})" if where else ""}.
Prelude {config.n_prelude} layers, recurrent block {config.n_recur} layers applied `num_recur` times (default
{config.decode.num_recur}), coda {config.n_coda} layers; width {config.n_embd}, context {config.sequence_len} tokens.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(DIR)
text = tokenizer.apply_chat_template([{{"role": "user", "content": "Hi"}}], tokenize=False, add_generation_prompt=True)
ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=32, num_recur=8)  # more recurrences = more compute per token
```
"""


# ------------------------------------------------------------------------------------------------------- export
def _prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export: --out {out} exists and is not a directory")
    others = sorted(set(os.listdir(out)) - set(EXPORT_FILES)) if out.is_dir() else []
    if others:  # someone's files: never overwritten or mixed with an export
        raise FileExistsError(
            f"export: {out} holds {others[0]!r}, which an export does not write; use an empty or new directory"
        )
    out.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(
    checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], push_to_hub: str | None = None
) -> Path:
    """Write the transformers directory of `checkpoint` (a local path or a storage URI) into `out_dir`.

    `out_dir` must be new, empty or an earlier export. With `push_to_hub` ("user/name") the directory is uploaded
    to that Hugging Face model repository (created if missing; needs a token, e.g. HF_TOKEN).
    Raises CheckpointError for a bad checkpoint, ValueError for one that cannot be exported (no tokenizer,
    state_init='noise').
    """
    source = os.fspath(checkpoint)
    loaded = load_checkpoint(fetch_checkpoint(source, INFERENCE_PARTS))
    config, tokenizer = loaded.config, loaded.tokenizer
    if tokenizer is None:
        raise ValueError(f"checkpoint {source} has no tokenizer/; the export needs one")
    weights = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    model_config = hf_model_config(config, tokenizer, dtype)  # refuses what cannot be exported before writing

    out = Path(out_dir)
    _prepare_out_dir(out)
    for module in (CONFIG_MODULE, MODEL_MODULE):
        shutil.copyfile(REMOTE_CODE_DIR / f"{module}.py", out / f"{module}.py")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})  # transformers reads "format"
    _write_json(out / "config.json", model_config)
    _write_json(out / "generation_config.json", _generation_config(tokenizer))
    _write_json(out / "tokenizer.json", hf_tokenizer_json(tokenizer))
    tokenizer_config = hf_tokenizer_config(tokenizer, config.sequence_len)
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(
        out / "special_tokens_map.json", {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token")}
    )
    (out / "README.md").write_text(_model_card(source, config, loaded.meta), encoding="utf-8")
    if push_to_hub:
        from huggingface_hub import HfApi  # only for uploads

        api = HfApi()
        api.create_repo(push_to_hub, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=push_to_hub, folder_path=str(out), repo_type="model")
    return out


# ---------------------------------------------------------------------------------------------------------- CLI
def cmd_export_hf(args: argparse.Namespace) -> int:
    try:
        out = export_hf(args.checkpoint, args.out, push_to_hub=args.push_to_hub)
    except (ValueError, FileExistsError) as exc:  # a checkpoint that cannot be exported, an occupied --out
        print(f"rnc: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"rnc: exported {args.checkpoint} -> {out}" + (f" (pushed to {args.push_to_hub})" if args.push_to_hub else "")
    )
    return 0


def add_export_subcommand(subparsers) -> None:
    """`rnc export hf --checkpoint URI --out DIR [--push-to-hub REPO]`."""
    export = subparsers.add_parser("export", help="export a checkpoint to other formats")
    formats = export.add_subparsers(dest="export_format", required=True)
    hf = formats.add_parser("hf", help="a Hugging Face transformers directory (trust_remote_code) + fast tokenizer")
    hf.add_argument("--checkpoint", required=True, help="checkpoint directory or URI (s3://bucket/run/sft/step_...)")
    hf.add_argument("--out", required=True, help="output directory (new, empty or an earlier export)")
    hf.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hugging Face model repo (user/name)")
    hf.set_defaults(func=cmd_export_hf)
