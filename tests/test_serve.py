"""The Serve application end to end: a tiny checkpoint on loopback S3, a real local Ray, real HTTP.

One deployment for the whole module (serve.run takes ~20 s here): tiers low (r 1-2, 1 replica), medium (r 3-4,
autoscaling 1-2) and high (r 5-8, 2 replicas), bearer auth on.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.serve_fixtures import (  # noqa: F401  (the *_fixture imports register fixtures by name)
    APP_NAME,
    BackgroundLoad,
    HeadlessChromium,
    LiveApp,
    find_chromium,
    running_replicas,
    serve_app_fixture,
    tiny_checkpoint_uri_fixture,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,  # a real Ray Serve deployment
    # The tests use 1 s autoscaling windows on purpose; Serve warns they are below its deprecated 10 s interval.
    pytest.mark.filterwarnings("ignore:.*look_back_period_s.*:FutureWarning"),
]

HI = [{"role": "user", "content": "hello there"}]


def post(app: LiveApp, body: dict | bytes, auth: bool = True, timeout: float = 60) -> httpx.Response:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    headers = {**(app.headers if auth else {}), "Content-Type": "application/json"}
    return httpx.post(f"{app.base_url}/v1/chat/completions", headers=headers, timeout=timeout, **kwargs)


def test_health_models_and_chat_page(serve_app: LiveApp) -> None:
    assert httpx.get(f"{serve_app.base_url}/health").json()["status"] == "ok"
    models = httpx.get(f"{serve_app.base_url}/v1/models", headers=serve_app.headers).json()["data"][0]
    assert models["id"] == serve_app.model and models["default_tier"] == "low"
    assert [(t["name"], t["r_min"], t["r_max"]) for t in models["tiers"]] == [
        ("low", 1, 2),
        ("medium", 3, 4),
        ("high", 5, 8),
    ]
    page = httpx.get(f"{serve_app.base_url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "v1/chat/completions" in page.text


def test_bearer_auth(serve_app: LiveApp) -> None:
    body = {"model": serve_app.model, "messages": HI, "max_tokens": 2}
    r = post(serve_app, body, auth=False)
    assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization"
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(f"{serve_app.base_url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert httpx.get(f"{serve_app.base_url}/v1/models").status_code == 401
    assert post(serve_app, body).status_code == 200


def test_budgets_land_on_different_tiers(serve_app: LiveApp) -> None:
    cases = [  # (budget, expected tier, expected r per token)
        ({}, "low", 2),
        ({"tier": "low"}, "low", 2),
        ({"max_recur": 1}, "low", 1),
        ({"max_recur": 3}, "medium", 3),
        ({"tier": "medium"}, "medium", 4),
        ({"max_recur": 8}, "high", 8),
        ({"tier": "high"}, "high", 6),
    ]
    # Greedy: a sampled first token can be the end of the turn, leaving no token whose r could be checked.
    for budget, tier, r in cases:
        body = {"model": serve_app.model, "messages": HI, "max_tokens": 6, "temperature": 0.0, **budget}
        r_json = post(serve_app, body).json()
        assert r_json["tier"] == tier, (budget, r_json)
        rec = r_json["recurrence"]
        assert rec["budget"] == r and set(rec["per_token"]) == {r} and rec["mean"] == r
        assert r_json["usage"]["completion_tokens"] == len(rec["per_token"]) <= 6
        assert r_json["usage"]["prompt_tokens"] > 0 and r_json["object"] == "chat.completion"


def test_adaptive_exit_spends_less_than_the_budget(serve_app: LiveApp) -> None:
    # A huge threshold exits every generated token after one recurrence, the first too (the last prompt token is
    # decoded with the exit rule; the rest of the prompt runs the full r).
    r_json = post(
        serve_app,
        {
            "model": serve_app.model,
            "messages": HI,
            "max_tokens": 8,
            "temperature": 0,
            "max_recur": 8,
            "exit_threshold": 1e9,
        },
    ).json()
    per_token = r_json["recurrence"]["per_token"]
    assert r_json["tier"] == "high" and set(per_token) == {1}
    assert r_json["recurrence"]["mean"] < 8


def test_openai_client_streams_with_budget_in_extra_body(serve_app: LiveApp) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{serve_app.base_url}/v1", api_key=serve_app.token, max_retries=2)
    assert [m.id for m in client.models.list()][:2] == [serve_app.model, f"{serve_app.model}:low"]
    stream = client.chat.completions.create(
        model=serve_app.model,
        messages=HI,
        max_tokens=12,
        stream=True,
        extra_body={"max_recur": 4},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    per_token = [r for c in chunks for r in (c.model_extra.get("recurrence") or {}).get("per_token", [])]
    pieces = [p for c in chunks for p in (c.model_extra.get("token_text") or [])]
    last = chunks[-1]
    assert {c.model_extra["tier"] for c in chunks} == {"medium"}
    assert last.choices[0].finish_reason in ("stop", "length") and last.usage is not None
    assert last.usage.completion_tokens == len(per_token) == len(pieces) and set(per_token) == {4}
    assert "".join(pieces) == text and last.model_extra["recurrence"]["mean"] == 4
    # and the same client without streaming
    done = client.chat.completions.create(model=serve_app.model, messages=HI, max_tokens=5, extra_body={"tier": "high"})
    assert done.model_extra["tier"] == "high" and done.usage.completion_tokens <= 5
    assert done.choices[0].message.role == "assistant"


BAD_INPUTS = [  # (body, expected status, the field the error must name)
    (b'{"model": "tiny-test", "messages": [', 400, "body"),
    ({"model": "tiny-test", "messages": []}, 400, "messages"),
    ({"model": "tiny-test", "messages": HI, "tier": "ultra"}, 400, "tier"),
    ({"model": "tiny-test", "messages": HI, "max_recur": 64}, 400, "max_recur"),
    ({"model": "tiny-test", "messages": HI, "max_recur": 0}, 400, "max_recur"),
    ({"model": "tiny-test", "messages": HI, "tier": "low", "max_recur": 5}, 400, "max_recur"),
    ({"model": "tiny-test", "messages": HI, "max_tokens": 65}, 400, "max_tokens"),
    ({"model": "tiny-test", "messages": [{"role": "user", "content": "many words " * 100}]}, 400, "messages"),
    ({"model": "tiny-test", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "tiny-test", "messages": HI, "exit_threshold": -1}, 400, "exit_threshold"),
    ({"model": "gpt-4", "messages": HI}, 404, "model"),
]


def test_bad_inputs_are_4xx_naming_the_field_and_serving_goes_on(serve_app: LiveApp) -> None:
    for body, status, param in BAD_INPUTS:
        for stream in (False, True):
            if isinstance(body, dict):
                body = {**body, "stream": stream}
            r = post(serve_app, body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param, err
            assert param.split("[")[0] in err["message"] or param == "body", err
    r = post(serve_app, {"model": serve_app.model, "messages": HI, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_200_concurrent_requests_all_succeed(serve_app: LiveApp) -> None:
    budgets = [{"tier": "low"}, {"max_recur": 3}, {"max_recur": 6}, {"tier": "high", "stream": True}]

    async def main() -> list[tuple[int, str]]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(
            base_url=serve_app.base_url, headers=serve_app.headers, timeout=120, limits=limits
        ) as client:

            async def one(i: int) -> tuple[int, str]:
                body = {
                    "model": serve_app.model,
                    "messages": [{"role": "user", "content": f"request {i}"}],
                    "max_tokens": 4,
                    **budgets[i % len(budgets)],
                }
                try:
                    r = await client.post("/v1/chat/completions", json=body)
                    return r.status_code, r.text
                except httpx.HTTPError as exc:
                    return -1, repr(exc)

            return await asyncio.gather(*(one(i) for i in range(200)))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    errors = [(s, t[:200]) for s, t in results if s != 200 or '"error"' in t]
    print(f"200 concurrent requests in {time.perf_counter() - t0:.1f}s")
    assert errors == []
    tiers = [json.loads(t)["tier"] for s, t in results[:3]]
    assert tiers == ["low", "medium", "high"]


def test_tier_scales_up_under_load_and_back_down_when_idle(serve_app: LiveApp) -> None:
    assert running_replicas(APP_NAME, "tier-medium") == 1
    body = {"model": serve_app.model, "messages": HI, "max_tokens": 48, "tier": "medium"}
    with BackgroundLoad(serve_app, body, concurrency=10) as load:
        up = wait_for(lambda: running_replicas(APP_NAME, "tier-medium") == 2, 60, what="tier-medium to scale to 2")
    assert load.failed == 0, load.errors[:3]
    assert running_replicas(APP_NAME, "tier-low") == 1  # the other tiers did not move
    down = wait_for(lambda: running_replicas(APP_NAME, "tier-medium") == 1, 60, what="tier-medium back to 1")
    print(f"scaled up in {up:.1f}s under load ({load.ok} requests), down in {down:.1f}s when idle")


def test_killed_replica_under_load_loses_no_requests(serve_app: LiveApp) -> None:
    import ray
    from ray import serve

    handle = serve.get_deployment_handle("tier-high", app_name=APP_NAME)
    victim = handle.info.remote().result()["actor_name"]
    body = {"model": serve_app.model, "messages": HI, "max_tokens": 24, "tier": "high"}
    with BackgroundLoad(serve_app, body, concurrency=8) as load:
        wait_for(lambda: load.ok >= 10, 30, what="load to start")
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.perf_counter()

        def replaced_by_a_new_replica() -> bool:
            alive = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#tier-high#" in a["name"]]
            return victim not in alive and len(alive) == 2 and running_replicas(APP_NAME, "tier-high") == 2

        replaced = wait_for(replaced_by_a_new_replica, 60, what="a replacement replica")
        ok_at_replacement = load.ok
        wait_for(lambda: load.ok >= ok_at_replacement + 10, 30, what="requests after the replacement")
    print(
        f"replica replaced {replaced:.1f}s after the kill; {load.ok} ok, {load.retried} retried, "
        f"{sum(t > killed_at for t in load.finished_at)} finished after the kill"
    )
    assert load.failed == 0, load.errors[:3]
    names = {handle.info.remote().result()["actor_name"] for _ in range(8)}
    assert victim not in names


def test_cli_deploy_status_shutdown_under_a_route_prefix(serve_app: LiveApp) -> None:
    """`rnc serve deploy` into the running cluster as a second application under /cli, then status and shutdown."""
    from serve.cli import deploy, shutdown, status
    from serve.config import load_config

    cfg = load_config(
        None,
        checkpoint=serve_app.config["checkpoint"],
        app_name="cli-test",
        route_prefix="/cli",
        cache_dir=serve_app.config["cache_dir"],
        env={k: v for k, v in serve_app.config["env"].items() if k != "RNC_SERVE_TOKEN"},  # auth off here
        ingress={"num_cpus": 0.05},
        # One row and one waiting slot: a burst overflows it (below).
        tiers=[{"name": "only", "r_max": 3, "num_cpus": 0.05, "max_running": 1, "max_waiting": 1}],
    )
    info = deploy(cfg, block=False)
    assert info["app"] == "cli-test" and info["status"] == "RUNNING"
    assert info["url"] == f"{serve_app.base_url}/cli"
    assert info["deployments"]["tier-only"]["replicas"] == {"RUNNING": 1}
    r = httpx.post(f"{info['url']}/v1/chat/completions", json={"messages": HI, "max_tokens": 3, "max_recur": 2})
    assert r.status_code == 200 and r.json()["tier"] == "only"  # no token needed: auth is off for this app
    full_replica_answers_503_with_retry_after_at_once(info["url"])
    page = httpx.get(info["url"], follow_redirects=True)  # /cli -> /cli/: the page's relative API paths resolve
    assert page.status_code == 200 and "<title>" in page.text and str(page.url).endswith("/cli/")
    assert set(status(None)) >= {"cli-test", APP_NAME}
    shutdown(None, "cli-test")
    wait_for(lambda: "cli-test" not in status(None), 30, what="the app to be deleted")
    assert post(serve_app, {"model": serve_app.model, "messages": HI, "max_tokens": 2}).status_code == 200


def full_replica_answers_503_with_retry_after_at_once(url: str) -> None:
    """A burst at a replica with one row and one waiting slot: the overflow is refused with 503 + Retry-After
    (streaming or not) while the first requests still run, and every request gets an answer."""

    async def burst() -> list[tuple[int, str | None, float]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            t0 = time.perf_counter()

            async def one(i: int) -> tuple[int, str | None, float]:
                body = {"messages": HI, "max_tokens": 48, "max_recur": 3, "temperature": 0, "stream": i % 2 == 1}
                r = await client.post("/v1/chat/completions", json=body)
                return r.status_code, r.headers.get("retry-after"), time.perf_counter() - t0

            return await asyncio.gather(*(one(i) for i in range(8)))

    results = asyncio.run(burst())
    refused = [t for status, retry, t in results if status == 503 and retry == "1"]
    done = [t for status, _, t in results if status == 200]
    assert len(refused) + len(done) == len(results), results
    assert refused and done and min(refused) < max(done), results


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install -y chromium)")
def test_chat_page_in_headless_chromium(serve_app: LiveApp, tmp_path: Path) -> None:
    browser = HeadlessChromium(find_chromium(), tmp_path / "profile")  # type: ignore[arg-type]
    try:
        browser.navigate(f"{serve_app.base_url}/")
        wait_for(lambda: browser.evaluate("document.body.dataset.state") == "auth", 20, what="the token prompt")
        browser.evaluate(f"""(() => {{ const t = document.getElementById("token");
            t.value = {json.dumps(serve_app.token)}; t.dispatchEvent(new Event("change")); }})()""")
        wait_for(lambda: browser.evaluate("document.body.dataset.state") == "idle", 20, what="the models list")
        assert browser.evaluate("document.getElementById('tier').options.length") == 3

        def ask(text: str, setup: str) -> dict:
            browser.evaluate(f"""(() => {{ {setup}
                document.getElementById("max-tokens").value = "12";
                document.getElementById("prompt").value = {json.dumps(text)};
                document.getElementById("send").click(); }})()""")
            wait_for(
                lambda: (
                    browser.evaluate("document.body.dataset.state") in ("idle", "error")
                    and browser.evaluate("document.querySelectorAll('.msg.assistant .stats, .msg.error').length") > 0
                ),
                30,
                what="the streamed answer",
            )
            return browser.evaluate("""(() => {
                const msgs = document.querySelectorAll(".msg.assistant"), last = msgs[msgs.length - 1];
                const toks = [...last.querySelectorAll(".tok")];
                const stats = last.querySelector(".stats");
                return { state: document.body.dataset.state, n: toks.length, tier: stats && stats.dataset.tier,
                         tokens: stats && Number(stats.dataset.tokens), rs: toks.map(t => Number(t.dataset.r)),
                         bg: toks.map(t => getComputedStyle(t).backgroundColor),
                         errors: [...document.querySelectorAll(".msg.error")].map(e => e.textContent) };
            })()""")

        low = ask("hello", 'document.getElementById("tier").value = "low";')
        assert low["state"] == "idle" and low["errors"] == [], low
        assert low["tier"] == "low" and low["n"] == low["tokens"] > 0 and set(low["rs"]) == {2}
        browser.evaluate("document.querySelectorAll('.stats').forEach(s => s.remove())")
        deep = ask(
            "and deeper?",
            """const m = document.getElementById("mode"); m.value = "recur";
            m.dispatchEvent(new Event("change")); document.getElementById("recur").value = "8";""",
        )
        assert deep["state"] == "idle" and deep["tier"] == "high" and set(deep["rs"]) == {8}
        shown = "getComputedStyle(document.getElementById('{}')).display !== 'none'"
        assert browser.evaluate(shown.format("recur-box")) and not browser.evaluate(shown.format("tier-box"))

        def alpha(css: str) -> float:  # "rgba(37, 99, 235, 0.1875)"
            return float(css.rstrip(")").split(",")[3])

        assert alpha(deep["bg"][0]) > alpha(low["bg"][0])  # more recurrences, darker token
        assert browser.evaluate("document.querySelectorAll('.msg.user').length") == 2
    finally:
        browser.close()


def test_metrics_are_exported_per_tier(serve_app: LiveApp) -> None:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError as exc:
        pytest.skip(f"no metrics agent on this Ray node ({exc})")

    def scraped() -> bool:
        nonlocal text
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return "ray_rnc_serve_generated_tokens_total{" in text and 'tier="high"' in text

    wait_for(scraped, 30, interval_s=1, what="rnc_serve metrics on the metrics port")
    for name in (
        "ray_rnc_serve_requests_total",
        "ray_rnc_serve_recurrences_total",
        "ray_rnc_serve_running_rows",
        "ray_rnc_serve_waiting_requests",
        "ray_rnc_serve_kv_blocks_used",
        "ray_rnc_serve_kv_blocks_total",
        "ray_rnc_serve_tokens_per_second",
        "ray_rnc_serve_mean_recurrences_per_token",
        "ray_rnc_serve_time_to_first_token_seconds_bucket",
        "ray_rnc_serve_http_responses_total",
    ):
        assert name in text, name
