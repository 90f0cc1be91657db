"""lm-evaluation-harness against `rnc serve`: lm-eval's `local-completions` model on the live /v1/completions, with
the budget chosen by model name, scores what this project's own evaluation scores.

The tiny checkpoint of tests/serve_fixtures.py is served on the session's Ray cluster (tiers low r 1-2, medium 3-4,
high 5-8) and exported with `export.export_hf` for the tokenizer lm-eval needs. Both tasks are defined here from local
jsonl files; nothing touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from checkpoints import load_checkpoint
from export import export_hf
from recursive_model.tasks.evaluate import run_categorical
from recursive_model.tasks.loaders import MMLU
from tests.lm_eval_tasks import LETTERS, mc_task_config, write_mc_jsonl
from tests.serve_fixtures import APP_NAME, LiveApp, deploy, make_tiny_checkpoint, serve_test_config

pytestmark = [
    pytest.mark.slow,  # a real Ray Serve deployment and lm-eval
    pytest.mark.filterwarnings("ignore:.*look_back_period_s.*:FutureWarning"),
]
lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")

GEN_ROWS = [("def add(a, b):", "return a + b"), ("import os", "os.path"), ("x = [1, 2", ", 3]")]
BUDGETS = {"@r1": ("low", 1), "@r8": ("high", 8)}  # model-name suffix -> (tier, r)


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """lm-eval task configs (multiple choice: loglikelihood; code completion: generate_until) and the MC jsonl."""
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    mc, gen = write_mc_jsonl(root / "mc.jsonl"), root / "gen.jsonl"
    gen.write_text("".join(json.dumps({"prefix": p, "target": t}) + "\n" for p, t in GEN_ROWS))
    tasks = [
        mc_task_config("rnc_server_mc", mc),
        {
            "task": "rnc_server_gen",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(gen)}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "{{prefix}}",
            "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
    ]
    return tasks, mc


@pytest.fixture(scope="module", name="serve_app")
def serve_app_fixture(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    """A tiny checkpoint whose every weight is random (so each recurrence moves the state), served from a local
    directory with bearer auth on. Its ingress reaches the tiers through Ray's object store, test_serve's through
    gRPC (the default), so both transports answer real requests."""
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", all_random=True)
    config = serve_test_config(str(checkpoint), str(tmp_path_factory.mktemp("serve-cache")))
    config["ingress"]["tier_transport"] = "object_store"
    yield from deploy(config)


@pytest.fixture(scope="module")
def export_dir(serve_app: LiveApp, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served checkpoint as a transformers directory: lm-eval's tokenizer."""
    return export_hf(serve_app.config["checkpoint"], tmp_path_factory.mktemp("hf") / "export")


def tier_stats(tier: str) -> list[dict]:
    """The load reports of every replica of a tier (a handle reaches one replica per call, so ask until each of
    them answered)."""
    from ray import serve

    handle = serve.get_deployment_handle(f"tier-{tier}", APP_NAME)
    seen: dict[str, dict] = {}
    for _ in range(20):
        info = handle.info.remote().result(timeout_s=30)
        seen[info["actor_name"]] = info
    return list(seen.values())


def test_lm_eval_local_completions_scores_what_rnc_eval_scores(
    serve_app: LiveApp, export_dir: Path, local_tasks: tuple[list[dict], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("OPENAI_API_KEY", serve_app.token)  # local-completions sends it as the bearer token
    tasks, mc_jsonl = local_tasks
    loaded = load_checkpoint(serve_app.config["checkpoint"])
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    letter_ids = [tokenizer.encode(x)[0] for x in LETTERS]
    mc_task = MMLU(source=str(mc_jsonl))
    before = {tier: tier_stats(tier) for tier, _ in BUDGETS.values()}
    loglikelihoods = {}
    for suffix, (_, r) in BUDGETS.items():
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=(
                f"model={serve_app.model}{suffix},base_url={serve_app.base_url}/v1/completions,"
                f"tokenizer={export_dir},tokenizer_backend=huggingface,max_length=128,num_concurrent=2,max_retries=1"
            ),
            tasks=tasks,
            apply_chat_template=True,
            log_samples=True,
            bootstrap_iters=0,
        )
        ours = run_categorical(model, tokenizer, mc_task, num_recur=r)
        assert results["results"]["rnc_server_mc"]["acc,none"] == pytest.approx(ours.accuracy), suffix
        samples = sorted(results["samples"]["rnc_server_mc"], key=lambda s: s["doc_id"])
        loglikelihoods[suffix] = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
        with torch.no_grad():  # every choice's log-likelihood is the full forward's at r
            for conversation, lls in zip(mc_task, loglikelihoods[suffix], strict=True):
                ids = torch.tensor([tokenizer.render_for_completion(conversation)])
                logp = torch.log_softmax(model(ids, num_recur=r)[0, -1], dim=-1)[letter_ids]
                torch.testing.assert_close(torch.tensor(lls, dtype=logp.dtype), logp, atol=1e-4, rtol=0)
        generated = results["samples"]["rnc_server_gen"]
        assert len(generated) == len(GEN_ROWS) and all(isinstance(s["filtered_resps"][0], str) for s in generated)
    assert loglikelihoods["@r1"] != loglikelihoods["@r8"]  # the model name reached the recurrence

    # The server's own accounting: each budget's tier scored and generated at its r, and only there.
    for tier, r in BUDGETS.values():
        old = {s["actor_name"]: s for s in before[tier]}
        deltas = []
        for now in tier_stats(tier):
            prev = old.get(now["actor_name"], {})
            scored = now["scored_tokens"] - prev.get("scored_tokens", 0)
            scored_r = now["scored_recurrences"] - prev.get("scored_recurrences", 0)
            tokens = now["tokens_generated"] - prev.get("tokens_generated", 0)
            recurrences = now["recurrences"] - prev.get("recurrences", 0.0)
            deltas.append((scored, scored_r, tokens, recurrences))
        assert sum(d[0] for d in deltas) > 0 and sum(d[2] for d in deltas) > 0, (tier, deltas)
        assert all(d[1] == r * d[0] and d[3] == pytest.approx(r * d[2]) for d in deltas), (tier, deltas)


def test_completions_report_the_budget_the_model_name_chose(serve_app: LiveApp) -> None:
    body = {"prompt": "hello", "max_tokens": 3, "temperature": 0}
    for suffix, (tier, r) in {"": ("low", 2), ":high": ("high", 6), **BUDGETS}.items():
        out = httpx.post(
            f"{serve_app.base_url}/v1/completions",
            json={**body, "model": serve_app.model + suffix},
            headers=serve_app.headers,
            timeout=60,
        ).json()
        assert (out["tier"], out["recurrence"]["budget"], out["model"]) == (tier, r, serve_app.model + suffix)
        assert set(out["choices"][0]["recurrence"]["per_token"]) <= {r}
    conflict = httpx.post(
        f"{serve_app.base_url}/v1/completions",
        json={**body, "model": serve_app.model + ":high", "tier": "low"},
        headers=serve_app.headers,
        timeout=60,
    )
    assert conflict.status_code == 400 and conflict.json()["error"]["param"] == "model"
    assert "tier='low'" in conflict.json()["error"]["message"]
    ids = [m["id"] for m in httpx.get(f"{serve_app.base_url}/v1/models", headers=serve_app.headers).json()["data"]]
    assert ids[:4] == [serve_app.model, *(f"{serve_app.model}:{t}" for t in ("low", "medium", "high"))]
    assert f"{serve_app.model}@r8" in ids
    stream = httpx.post(
        f"{serve_app.base_url}/v1/completions",
        json={**body, "model": serve_app.model + "@r4", "stream": True, "echo": True},
        headers=serve_app.headers,
        timeout=60,
    )
    events = [e.removeprefix("data: ") for e in stream.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["text"].endswith("hello") and chunks[-1]["recurrence"]["budget"] == 4
    assert {c["tier"] for c in chunks} == {"medium"} and chunks[-1]["usage"]["completion_tokens"] <= 3
