"""`rnc export hf`: the exported transformers directory computes what this project computes, without this project.

Equivalence with this project's code: logits at r = 1, 4, 8 (GPT.forward), cached decode and a left-padded batch
(the full forward), greedy generate() (Engine.generate_batch), token ids on arbitrary unicode (Tokenizer.encode), the
chat template (render_conversation / render_for_completion) and lm-eval's `hf` model (run_categorical). The exported
model is loaded in a subprocess that cannot import this project (tests/hf_export_probe.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoints import save_checkpoint
from export import add_export_subcommand, export_hf
from recursive_model import GPT, SPECIAL_TOKENS, Engine, GPTConfig, Tokenizer
from recursive_model.tasks.evaluate import run_categorical
from recursive_model.tasks.loaders import MMLU
from tests.lm_eval_tasks import LETTERS, mc_task_config, write_mc_jsonl

transformers = pytest.importorskip("transformers", reason="needs the eval extra: pip install -e '.[eval]'")

PROBE = Path(__file__).with_name("hf_export_probe.py")
PROJECT_PACKAGES = ["recursive_model", "checkpoints", "pipelines", "serve", "export"]
TEXT = [
    "the recurrent block is applied r times to the state.",
    "hello world 12 + 34 = 46",
    "ab" * 50,
    "Ünïcödé ñ 日本語のテキスト текст 🙂 — naïve café",
    "def f(x):\n    return x ** 2  # square\n\n",
] * 20
VARIANTS = {  # the two injections and the two deterministic initial states; a local attention window
    "concat_embed": dict(inject_mode="concat_linear", state_init="embed"),
    "add_zeros": dict(inject_mode="add", state_init="zeros"),
    "window": dict(attn_window=3, coda_window=5),
}
RECURS = (1, 4, 8)
MAX_NEW = 12
TOOL_ANSWER = [  # assistant content as parts: text, a calculator call, its output, text
    {"type": kind, "text": text}
    for kind, text in (("text", "Let me compute. "), ("python", "12 + 34"), ("python_output", "46"), ("text", " 46."))
]
CONVERSATION = {
    "messages": [
        {"role": role, "content": content}
        for role, content in (
            ("system", "Answer briefly."),
            ("user", "What is 12 + 34?"),
            ("assistant", TOOL_ANSWER),
            ("user", "And ab * 3?"),
            ("assistant", "ababab"),
        )
    ]
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(iter(TEXT), vocab_size=600)


def random_model(tokenizer: Tokenizer, **overrides) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig.from_preset(
        "tiny", vocab_size=tokenizer.vocab_size, sequence_len=256, decode=dict(num_recur=2), **overrides
    )
    model = GPT(config)
    with torch.no_grad():  # every weight random: the default init zeroes output projections (blocks = identity)
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer) -> dict[str, tuple[GPT, Path]]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export-hf")
    out = {}
    for name, overrides in VARIANTS.items():
        model = random_model(tokenizer, **overrides)
        save_checkpoint(root / name / "ckpt", model, model.config, tokenizer, {"stage": "sft", "step": 3})
        out[name] = (model, export_hf(root / name / "ckpt", root / name / "hf"))
    return out


def run_probe(spec: dict, workdir: Path) -> dict:
    """Run tests/hf_export_probe.py on `spec` in a Python that sees site-packages but not this project."""
    paths = sysconfig.get_paths()
    spec = {
        **spec,
        "site_packages": sorted({paths["purelib"], paths["platlib"]}),
        "forbidden": PROJECT_PACKAGES,
        "out": str(workdir / "results.pt"),
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(workdir),
        "HF_HOME": str(workdir / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(PROBE), str(workdir / "spec.json")],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode:
        pytest.fail(f"probe failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return torch.load(workdir / "results.pt", weights_only=True)


def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    """Prompts of different lengths (a left-padded batch for generate), a chat prompt among them."""
    return [
        tokenizer.render_for_completion(CONVERSATION)[:30],
        tokenizer.encode("hello world", prepend="<|bos|>"),
        tokenizer.encode("the recurrent block is", prepend="<|bos|>"),
    ]


@pytest.fixture(scope="module")
def probe(exported, tokenizer, tmp_path_factory) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=g).tolist()
    rows = [ids[0][:20], ids[1][:11]]
    jobs = [
        {
            "dir": str(d),
            "ids": ids,
            "recurs": list(RECURS),
            "cached": {"num_recur": 4, "prefill": 9},
            "padded": {"rows": rows, "num_recur": 4},
            "generate": {"prompts": prompts(tokenizer), "recurs": [1, 4], "max_new_tokens": MAX_NEW},
        }
        for _, d in exported.values()
    ]
    texts = [TEXT[3], "<|bos|> typed as text <|assistant_end|>", "", " \n\n\t x  y\r\n", "日本語 12345678 🙂🙂"]
    spec = {
        "models": jobs,
        "tokenizer": {
            "dir": jobs[0]["dir"],
            "texts": texts,
            "specials": SPECIAL_TOKENS,
            "messages": CONVERSATION["messages"][:-1],
        },
    }
    results = run_probe(spec, tmp_path_factory.mktemp("probe"))
    return {"ids": ids, "rows": rows, "texts": texts, **results}


# ------------------------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_the_project_forward_at_r_1_4_8(exported, probe, variant):
    model, _ = exported[variant]
    result = probe["models"][list(VARIANTS).index(variant)]
    assert result["module"].startswith("transformers_modules.")  # the exported file, not this project's code
    ids = torch.tensor(probe["ids"])
    with torch.no_grad():
        for r in RECURS:
            ours = model(ids, num_recur=r)
            torch.testing.assert_close(result["logits"][r], ours, atol=1e-5, rtol=0)
        # Different r give different logits: num_recur reaches the recurrence.
        assert not torch.allclose(result["logits"][1], result["logits"][8], atol=1e-3)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decode_and_left_padding_equal_the_full_forward(exported, probe, variant):
    model, _ = exported[variant]
    result = probe["models"][list(VARIANTS).index(variant)]
    with torch.no_grad():
        full = model(torch.tensor(probe["ids"]), num_recur=4)
        torch.testing.assert_close(result["cached_logits"], full, atol=1e-5, rtol=0)
        assert "num_recur=5 needs a cache of" in result["other_r_error"]
        padded = result["padded_logits"]
        for b, row in enumerate(probe["rows"]):
            ours = model(torch.tensor([row]), num_recur=4)[0]
            torch.testing.assert_close(padded[b, padded.size(1) - len(row) :], ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generate_equals_engine(exported, probe, tokenizer, variant):
    model, _ = exported[variant]
    result = probe["models"][list(VARIANTS).index(variant)]
    engine = Engine(model, tokenizer)
    stops = engine.stop_ids
    for r in (1, 4):
        ours = engine.generate_batch(prompts(tokenizer), max_tokens=MAX_NEW, temperature=0.0, num_recur=r, exit=None)
        for theirs, mine in zip(result["generated"][r], ours, strict=True):
            # Engine runs the calculator after <|python_start|>; generate() does not, so such a row would differ.
            assert tokenizer.encode_special("<|python_start|>") not in mine.tokens
            cut = next((i for i, t in enumerate(theirs) if t in stops), len(theirs))
            assert theirs[:cut] == mine.tokens
            assert len(mine.tokens) > 0


# -------------------------------------------------------------------------------------------------- the tokenizer
@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    # The fast tokenizer class directly: AutoTokenizer would first look at config.json's remote code (the probe
    # covers AutoTokenizer in a clean process).
    _, directory = exported["concat_embed"]
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))


# Arbitrary unicode, and text over the training alphabet (so that merged tokens, not only bytes, are produced).
ALPHABET = "".join(sorted(set("".join(TEXT)))) + "<|>_"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=120), st.text(alphabet=ALPHABET, max_size=120)))
def test_token_ids_equal_tokenizer_encode_on_arbitrary_unicode(tokenizer, hf_tokenizer, text):
    ids = hf_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids == tokenizer.encode(text)
    assert hf_tokenizer.decode(ids) == tokenizer.decode(ids)


def test_tokenizer_in_a_clean_process_specials_and_bos(probe, tokenizer):
    result = probe["tokenizer"]
    assert result["as_text"] == [tokenizer.encode(t) for t in probe["texts"]]
    assert result["with_bos"] == tokenizer.encode(probe["texts"][0], prepend="<|bos|>")  # add_special_tokens=True
    assert result["specials"] == {name: tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
    assert result["chat"] == tokenizer.render_for_completion(CONVERSATION)


def test_special_token_strings_are_special_ids_unless_split(tokenizer, hf_tokenizer):
    text = "a<|user_end|>b"
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == [
        *tokenizer.encode("a"),
        tokenizer.encode_special("<|user_end|>"),
        *tokenizer.encode("b"),
    ]
    assert hf_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tokenizer.encode(
        text
    )


def test_chat_template_renders_the_project_conversation(tokenizer, hf_tokenizer):
    def render(messages, prompt: bool) -> list[int]:
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        return hf_tokenizer(text, add_special_tokens=False)["input_ids"]

    messages = CONVERSATION["messages"]
    assert render(messages[:-1], prompt=True) == tokenizer.render_for_completion(CONVERSATION)
    assert render(messages, prompt=False) == tokenizer.render_conversation(CONVERSATION)[0]
    with pytest.raises(Exception, match="alternate"):
        render([messages[1], messages[1]], prompt=True)


# ------------------------------------------------------------------------------------------------------- lm-eval
@pytest.mark.slow  # lm-eval loads and scores in a fresh process: about a minute on 2 cores
def test_lm_eval_hf_model_accuracy_equals_run_categorical(exported, tokenizer, tmp_path):
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")
    model, directory = exported["concat_embed"]
    jsonl = write_mc_jsonl(tmp_path / "mc.jsonl")
    r = 4  # not the checkpoint's default (2): the budget reaches the model through model_args
    result = run_probe(
        {"lm_eval": {"dir": str(directory), "task": mc_task_config("rnc_local_mc", jsonl), "num_recur": r}}, tmp_path
    )["lm_eval"]

    task = MMLU(source=str(jsonl))
    ours = run_categorical(model, tokenizer, task, num_recur=r)
    assert result["acc"] == pytest.approx(ours.accuracy)
    letter_ids = [tokenizer.encode(x)[0] for x in LETTERS]
    with torch.no_grad():
        for conversation, lls in zip(task, result["loglikelihoods"], strict=True):
            ids = torch.tensor([tokenizer.render_for_completion(conversation)])
            logp = torch.log_softmax(model(ids, num_recur=r)[0, -1], dim=-1)[letter_ids]
            torch.testing.assert_close(torch.tensor(lls, dtype=logp.dtype), logp, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- export and CLI
def test_export_refuses_noise_state_and_foreign_files(tokenizer, tmp_path):
    model = random_model(tokenizer, state_init="noise")
    save_checkpoint(tmp_path / "noise", model, model.config, tokenizer)
    with pytest.raises(ValueError, match=r"state_init='noise'.*allowed \('embed', 'zeros'\)"):
        export_hf(tmp_path / "noise", tmp_path / "out-noise")
    assert not (tmp_path / "out-noise").exists()
    model = random_model(tokenizer)
    save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_hf(tmp_path / "ckpt", tmp_path / "occupied")


def test_cli_export_hf_writes_the_directory(tokenizer, tmp_path, capsys):
    model = random_model(tokenizer)
    save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer)
    parser = argparse.ArgumentParser(prog="rnc")
    add_export_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", "hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    assert args.func(args) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["n_prelude"], config["n_recur"], config["n_coda"], config["num_recur"]) == (1, 2, 1, 2)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_recursive_gpt.RecursiveGPTForCausalLM"
    assert "exported" in capsys.readouterr().out
    (tmp_path / "hf" / "stray").write_text("x")
    assert args.func(args) == 2  # an occupied --out is a one-line error, not a traceback
