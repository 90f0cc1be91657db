"""Runs an exported Hugging Face directory the way a user without this project would, for tests/test_export_hf.py.

Started as `python -I -S tests/hf_export_probe.py SPEC.json`: no site processing (so no editable install of this
project), no script directory on sys.path; only the site-packages directories named in the spec are added. It first
proves that none of this project's packages can be imported, then loads every exported directory with transformers
(and, for an `lm_eval` job, runs lm-eval's `hf` model on it) and writes the results with torch.save to spec["out"].
"""

import importlib.util
import json
import sys

spec = json.load(open(sys.argv[1], encoding="utf-8"))
sys.path.extend(spec["site_packages"])
importable = [name for name in spec["forbidden"] if importlib.util.find_spec(name) is not None]
if importable:
    raise SystemExit(f"not isolated: {importable} importable from sys.path={sys.path}")

import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(1)
# transformers 5 names the cache `cache` (argument and output field); 4.x named it `past_key_values`.
CACHE = (
    "cache"
    if "cache" in transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__
    else "past_key_values"
)


def model_results(job: dict) -> dict:
    """Logits of a full forward, of a cached prefill + decode and of a left-padded batch; greedy generate()."""
    model = transformers.AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=True).eval()
    ids = torch.tensor(job["ids"])
    out: dict = {"module": type(model).__module__, "logits": {}}
    with torch.no_grad():
        for r in job["recurs"]:
            out["logits"][r] = model(ids, num_recur=r).logits
        r, split = job["cached"]["num_recur"], job["cached"]["prefill"]
        step = model(ids[:, :split], num_recur=r, use_cache=True)
        cache, pieces = step[CACHE], [step.logits]
        for t in range(split, ids.size(1)):
            step = model(ids[:, t : t + 1], num_recur=r, **{CACHE: cache})
            cache = step[CACHE]
            pieces.append(step.logits)
        out["cached_logits"] = torch.cat(pieces, dim=1)
        try:  # a cache holds the keys of the recurrences it was filled at: another r must be refused
            model(ids[:, :1], num_recur=r + 1, **{CACHE: cache})
            out["other_r_error"] = None
        except ValueError as exc:
            out["other_r_error"] = str(exc)
        rows = job["padded"]["rows"]
        width = max(len(row) for row in rows)
        pad = model.config.pad_token_id
        padded = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        out["padded_logits"] = model(padded, attention_mask=mask, num_recur=job["padded"]["num_recur"]).logits
    out["generated"] = {}
    prompts = job["generate"]["prompts"]
    width = max(len(p) for p in prompts)
    padded = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    for r in job["generate"]["recurs"]:
        tokens = model.generate(
            padded, attention_mask=mask, num_recur=r, do_sample=False, max_new_tokens=job["generate"]["max_new_tokens"]
        )
        out["generated"][r] = tokens[:, width:].tolist()
    return out


def tokenizer_results(job: dict) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["dir"])
    return {
        "as_text": [
            tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] for t in job["texts"]
        ],
        "with_bos": tokenizer(job["texts"][0])["input_ids"],
        "specials": {name: tokenizer.convert_tokens_to_ids(name) for name in job["specials"]},
        "chat": tokenizer(
            tokenizer.apply_chat_template(job["messages"], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"],
    }


def lm_eval_results(job: dict) -> dict:
    import lm_eval

    task = job["task"]  # tests/lm_eval_tasks.py: mc_task_config
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={job['dir']},trust_remote_code=True,num_recur={job['num_recur']}",
        tasks=[task],
        device="cpu",
        batch_size=4,
        apply_chat_template=True,
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = sorted(results["samples"][task["task"]], key=lambda s: s["doc_id"])
    return {
        "acc": results["results"][task["task"]]["acc,none"],
        "loglikelihoods": [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples],
    }


results = {
    "transformers": transformers.__version__,
    "models": [model_results(job) for job in spec.get("models", [])],
    "tokenizer": tokenizer_results(spec["tokenizer"]) if "tokenizer" in spec else None,
    "lm_eval": lm_eval_results(spec["lm_eval"]) if "lm_eval" in spec else None,
}
torch.save(results, spec["out"])
