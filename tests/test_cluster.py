"""cluster/: every manifest parses, its commands parse with the real `rnc` parser, the configs it embeds validate with
the project's typed configs, every Ray version equals the pin, the generated files are current; and (slow) a real
two-node Ray cluster on this machine, started by cluster/local/up.sh, trains the tiny pipeline with one DDP worker
per node and writes its checkpoints to a loopback S3 endpoint.

No Kubernetes here: KubeRay manifests are checked by parsing (pod templates against the Kubernetes schemas when
`kubernetes-validate` is installed), the cluster launcher YAML with Ray's own schema check (what `ray up` runs first).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.grafana_dashboard import SERVE_METRICS, TRAIN_METRICS
from pipelines.config import PipelineConfig
from rnc.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LOCAL = CLUSTER / "local"
LAUNCHER = CLUSTER / "aws" / "ray-cluster.yaml"
DASHBOARD_JSON = CLUSTER / "monitoring" / "rnc_grafana_dashboard.json"


def pinned_ray() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d.split("==")[1] for d in deps if d.startswith("ray[") or d.startswith("ray==")]
    return pin


def load_generator():
    spec = importlib.util.spec_from_file_location("cluster_generate", CLUSTER / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests(kind: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    out = [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in docs(p)]
    return [(p, d) for p, d in out if kind is None or d["kind"] == kind]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, RayCluster spec) of the RayCluster, the RayJobs' clusters and the RayService's cluster."""
    out = [(f"{p.name} RayCluster", d["spec"]) for p, d in manifests("RayCluster")]
    out += [(f"{p.name} RayJob", d["spec"]["rayClusterSpec"]) for p, d in manifests("RayJob")]
    out += [(f"{p.name} RayService", d["spec"]["rayClusterConfig"]) for p, d in manifests("RayService")]
    return out


def pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def parse_rnc(command: str):
    """Parse `rnc ...` with the real parser (argparse exits on an unknown flag: turn that into a test failure)."""
    argv = shlex.split(command)
    assert argv[0] == "rnc", command
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"`{command}` does not parse with the rnc parser (exit {exc.code})") from None


# ------------------------------------------------------------------------------------------------------- parsing
def test_every_yaml_in_cluster_parses_and_the_expected_manifests_exist():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 9
    for path in files:
        parsed = docs(path)
        assert parsed and all(isinstance(d, dict) for d in parsed), path
    kinds = sorted(d["kind"] for _, d in manifests())
    for kind, n in (("RayCluster", 1), ("RayJob", 2), ("RayService", 1), ("PodMonitor", 1), ("Secret", 3)):
        assert kinds.count(kind) == n, (kind, kinds)
    for _, d in manifests():
        assert d["apiVersion"] in ("v1", "ray.io/v1", "monitoring.coreos.com/v1"), d["apiVersion"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), d["metadata"]["name"]
    json.loads(DASHBOARD_JSON.read_text())


def test_generated_files_are_up_to_date():
    generated = load_generator().render_all()
    stale = [rel for rel, text in generated.items() if (CLUSTER / rel).read_text() != text]
    assert not stale, f"run `python cluster/generate.py`: stale {stale}"


def test_ray_version_everywhere_equals_the_pin():
    pin = pinned_ray()
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == pin, where
        for template in pod_templates(spec):
            for c in template["spec"]["containers"]:
                assert c["image"].rsplit(":", 1)[1].startswith(f"{pin}-"), (where, c["image"])
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M) == [pin]
    assert f"recursive-nanochat:{pin}-" in dockerfile
    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert any(f"ray.__version__ == '{pin}'" in c for c in launcher["setup_commands"])
    # Any other spelling of a Ray version anywhere in cluster/ (docs included) must be the pin as well.
    patterns = [
        r"rayVersion:\s*['\"]?([\d.]+)",
        r"ray(?:\[[^\]]*\])?==([\d.]+)",
        r"rayproject/ray:([\d.]+)",
        r"RAY_VERSION=([\d.]+)",
        r"recursive-nanochat:([\d.]+)-",
        r"ray\.__version__ == '([\d.]+)'",
    ]
    for path in CLUSTER.rglob("*"):
        if (
            path.is_file()
            and path.suffix in (".yaml", ".md", ".sh", ".py", ".json", "")
            and "__pycache__" not in (path.parts)
        ):
            for pattern in patterns:
                for version in re.findall(pattern, path.read_text()):
                    assert version == pin, (path, pattern, version)


# ----------------------------------------------------------------------------------------------------- commands
def test_rayjob_entrypoints_parse_and_read_their_mounted_configmaps():
    expected = {"rnc-pipeline": "cmd_pipeline_run", "rnc-tune": "cmd_tune"}
    for path, job in manifests("RayJob"):
        args = parse_rnc(job["spec"]["entrypoint"])
        assert args.func.__name__ == expected.pop(job["metadata"]["name"]), path
        # --config names a key of the ConfigMap in the same file, mounted in the head pod (the driver runs there).
        config = Path(args.config)
        (cm,) = [d for d in docs(path) if d["kind"] == "ConfigMap"]
        assert config.name in cm["data"], (path, config)
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        (volume,) = [v for v in head["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
        (mount,) = [m for c in head["containers"] for m in c["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == str(config.parent), (path, mount)
    assert not expected


def test_every_rnc_command_in_cluster_docs_and_comments_parses():
    """Commands shown in cluster/README.md and in the manifests' comments are kept runnable."""
    commands = []
    for path in [CLUSTER / "README.md", *CLUSTER.rglob("*.yaml"), CLUSTER / "Dockerfile"]:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"^\s*(#\s*)?(\$\s*)?", "", line)
            if line.startswith("rnc "):
                commands.append(line.split("  #")[0].split(" # ")[0].strip().rstrip("`"))
    assert len(commands) >= 12, commands
    # Shell variables in them must be ones the local cluster's state file exports; substitute plausible values.
    state_block = re.search(r'cat >"\$STATE" <<EOF\n(.*?)\nEOF', (LOCAL / "up.sh").read_text(), re.S).group(1)
    exported = set(re.findall(r"\b([A-Z][A-Z0-9_]+)=", state_block))

    def value(name: str) -> str:
        assert name in exported, f"${name} is not exported by local/up.sh's state file"
        if name.endswith("PORT"):
            return "26389"
        if name.endswith(("URL", "ENDPOINT")):
            return "http://127.0.0.1:8265"
        return "127.0.0.1:26380" if name.endswith("ADDRESS") else "x"

    for command in commands:
        parse_rnc(re.sub(r"\$\{?(\w+)\}?", lambda m: value(m.group(1)), command))


# ------------------------------------------------------------------------------------------------ typed configs
def test_embedded_pipeline_config_validates_and_is_the_d20_recursive_preset():
    (cm,) = [d for _, d in manifests("ConfigMap") if d["metadata"]["name"] == "rnc-pipeline"]
    cfg = PipelineConfig.from_dict(yaml.safe_load(cm["data"]["pipeline.yaml"]))
    preset = PipelineConfig.from_preset("d20-recursive")
    assert cfg.storage.uri.startswith("s3://")
    assert {**cfg.to_dict(), "storage": None} == {**preset.to_dict(), "storage": None}
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 8
    # One training node of the RayJob's cluster holds all the workers the config asks for.
    (job,) = [j for _, j in manifests("RayJob") if j["metadata"]["name"] == "rnc-pipeline"]
    limits = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]
    assert int(limits["nvidia.com/gpu"]) >= cfg.scaling.num_workers * cfg.scaling.gpus_per_worker
    assert int(limits["cpu"]) >= cfg.scaling.num_workers * cfg.scaling.cpus_per_worker


def test_embedded_sweep_validates():
    from pipelines.sweep import SweepSpec

    (cm,) = [d for _, d in manifests("ConfigMap") if d["metadata"]["name"] == "rnc-sweep"]
    spec = SweepSpec.from_dict(yaml.safe_load(cm["data"]["sweep.yaml"]))
    assert spec.trial_runner == "train" and spec.base.scaling.use_gpu
    assert spec.base.storage.uri.startswith("s3://")


def test_rayservice_serve_config_is_what_rnc_serve_build_writes(tmp_path):
    """serveConfigV2 == the output of the real `rnc serve build` for the ServeConfig it carries."""
    from ray.serve.schema import ServeDeploySchema

    ((_, service),) = manifests("RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(app["args"]))
    args = parse_rnc(f"rnc serve build --config {tmp_path / 'serve.yaml'} -o {tmp_path / 'out.yaml'}")
    assert args.func(args) == 0
    assert yaml.safe_load((tmp_path / "out.yaml").read_text()) == serve_config
    # The proxies listen where the head pod exposes the serve port.
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": serve_config["http_options"]["port"], "name": "serve"} in head["ports"]


def test_local_configs_validate_and_spread_one_worker_per_node():
    from serve.config import load_config

    cfg = PipelineConfig.from_yaml(LOCAL / "pipeline-tiny-2node.yaml")
    up = (LOCAL / "up.sh").read_text()
    node_cpus = [
        int(re.search(rf"{var}=\$\{{RNC_{var}:-(\d+)\}}", up).group(1)) for var in ("HEAD_CPUS", "WORKER_CPUS")
    ]
    # Two workers that each need more than half of a node's CPUs cannot share a node: one lands on each.
    assert cfg.scaling.num_workers == 2 and all(cfg.scaling.cpus_per_worker > n / 2 for n in node_cpus)
    assert all(cfg.scaling.cpus_per_worker <= n for n in node_cpus)
    serve = load_config(LOCAL / "serve-tiny.yaml", checkpoint="s3://rnc/runs/tiny-2node/sft/step_000006")
    assert sum(t.num_cpus for t in serve.tiers) + serve.ingress.num_cpus <= sum(node_cpus)


# ----------------------------------------------------------------------------------------------- KubeRay shapes
# Field names of KubeRay's ray.io/v1 API used here (from its API reference); a typo must not reach a cluster.
RAYCLUSTER_FIELDS = {
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headGroupSpec",
    "workerGroupSpecs",
    "headServiceAnnotations",
    "suspend",
    "managedBy",
    "gcsFaultToleranceOptions",
    "authOptions",
}
HEAD_FIELDS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_FIELDS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "rayStartParams",
    "template",
    "idleTimeoutSeconds",
    "suspend",
    "scaleStrategy",
    "numOfHosts",
}
AUTOSCALER_FIELDS = {
    "idleTimeoutSeconds",
    "upscalingMode",
    "resources",
    "image",
    "imagePullPolicy",
    "env",
    "envFrom",
    "volumeMounts",
    "securityContext",
    "version",
}
RAYJOB_FIELDS = {
    "entrypoint",
    "runtimeEnvYAML",
    "shutdownAfterJobFinishes",
    "ttlSecondsAfterFinished",
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "clusterSelector",
    "submissionMode",
    "submitterPodTemplate",
    "submitterConfig",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "entrypointResources",
    "jobId",
    "metadata",
    "suspend",
    "managedBy",
    "deletionStrategy",
}
RAYSERVICE_FIELDS = {
    "serveConfigV2",
    "rayClusterConfig",
    "upgradeStrategy",
    "serveService",
    "excludeHeadPodFromServeSvc",
}


def test_kuberay_manifests_use_known_fields_secrets_and_metrics_ports():
    for _, job in manifests("RayJob"):
        assert set(job["spec"]) <= RAYJOB_FIELDS, set(job["spec"]) - RAYJOB_FIELDS
    for _, service in manifests("RayService"):
        assert set(service["spec"]) <= RAYSERVICE_FIELDS, set(service["spec"]) - RAYSERVICE_FIELDS
    secret_names = {d["metadata"]["name"] for _, d in manifests("Secret")}
    for where, spec in cluster_specs():
        assert set(spec) <= RAYCLUSTER_FIELDS, (where, set(spec) - RAYCLUSTER_FIELDS)
        assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_FIELDS, where
        assert set(spec["headGroupSpec"]) <= HEAD_FIELDS, where
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", where  # no work on the head
        assert spec["workerGroupSpecs"], where
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_FIELDS, (where, set(group) - WORKER_FIELDS)
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
            assert int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert all(isinstance(v, str) for v in group["rayStartParams"].values()), where  # KubeRay wants strings
            (container,) = group["template"]["spec"]["containers"]
            # S3 credentials come from a Secret (envFrom); Prometheus scrapes the port named "metrics".
            refs = {e["secretRef"]["name"] for e in container["envFrom"] if not e["secretRef"].get("optional")}
            assert refs and refs <= secret_names, where
            port = group["rayStartParams"]["metrics-export-port"]
            assert {"containerPort": int(port), "name": "metrics"} in container["ports"], where
    ((_, monitor),) = manifests("PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_pod_templates_validate_against_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate for this check")
    n = 0
    for _, d in manifests():
        if d["kind"] in ("ConfigMap", "Secret"):
            kv.validate(d, "1.32.0", strict=True)
            n += 1
    for _, spec in cluster_specs():
        for template in pod_templates(spec):
            kv.validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
                "1.32.0",
                strict=True,
            )
            n += 1
    assert n >= 10


# --------------------------------------------------------------------------------------------- launcher, image
def test_cluster_launcher_passes_rays_own_config_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(raw))  # the checks `ray up` runs before it talks to AWS
    assert raw["provider"]["type"] == "aws"
    workers = [t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]]
    assert workers and all("IamInstanceProfile" in t["node_config"] for t in workers)  # S3 by instance profile
    assert all(t["node_config"]["InstanceType"].startswith(("p", "g")) for t in workers)  # GPU instances
    assert any("pip install" in c and "recursive-nanochat" in c for c in raw["setup_commands"])


def test_dockerfile_builds_the_project_on_cuda_with_python_311():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text, re.M) and "FROM ${CUDA_IMAGE}" in text
    assert "python3.11 -m venv" in text and "pip install ." in text and "wget" in text
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    # every package pyproject installs must reach the image, or `pip install .` builds a project missing one
    include = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    packages = [name.strip(' "*') for name in include.split(",")]
    assert {"recursive_model", "checkpoints", "pipelines", "serve", "rnc", "export"} <= set(packages)
    for needed in ("pyproject.toml", "README.md", *(f"{p}/" for p in packages)):
        assert f"!{needed}" in ignore, needed
    copied_dirs = {c.split()[0] for c in re.findall(r"^COPY --chown=\S+ (.+) \S+$", text, re.M)}
    assert set(packages) <= copied_dirs, set(packages) - copied_dirs
    for copied in re.findall(r"^COPY --chown=\S+ (.+) \S+$", text, re.M):
        for name in copied.split():
            assert (ROOT / name).exists(), name


# ---------------------------------------------------------------------------------------------------- scripts
def test_local_scripts_are_strict_bash_and_never_ray_stop():
    for name in ("up.sh", "down.sh"):
        path = LOCAL / name
        text = path.read_text()
        assert "set -euo pipefail" in text
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"\bray\b[^\n]*\bstop\b", code.replace("$RAY_BIN", "ray")), name
        subprocess.run(["bash", "-n", str(path)], check=True)
        if shutil.which("shellcheck"):
            subprocess.run(["shellcheck", str(path)], check=True)


# ---------------------------------------------------------------------------------------------------- metrics
def _recorded_metric_names(monkeypatch) -> dict[str, str]:
    """Exported name -> type of every custom metric the training and serving code creates, by running that code
    with recording stand-ins for ray.util.metrics."""
    import ray.util.metrics as ray_metrics

    created: dict[str, str] = {}

    def recorder(kind: str):
        class Recorder:
            def __init__(self, name, description="", tag_keys=None, boundaries=None):
                created[name] = kind

            def __getattr__(self, _):
                return lambda *a, **k: None

        return Recorder

    for kind in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(ray_metrics, kind, recorder(kind.lower()))
    from pipelines.train_loop import RaySession
    from serve import metrics as serve_metrics

    class Job:
        stage = "pretrain"
        config = PipelineConfig.from_preset("tiny")

    session = RaySession.__new__(RaySession)
    session.rank, session.job, session._gauges = 0, Job(), {}
    session._export_metrics(
        {
            "loss": 1.0,
            "tokens_per_s": 1.0,
            "mfu": 0.1,
            "num_recur": 2,
            "lr": 1e-3,
            "step": 1,
            "grad_norm": 1.0,
            "val_bpb_r1": 1.0,
            "val_bpb_r4": 0.9,
        }
    )
    serve_metrics.TierMetrics("low")
    serve_metrics.IngressMetrics()
    return {f"ray_{n}{'_total' if k == 'counter' else ''}": k for n, k in created.items()}


def test_documented_metrics_are_exactly_the_ones_the_code_exports(monkeypatch):
    documented = {name: kind for name, kind, _, _ in TRAIN_METRICS + SERVE_METRICS}
    assert documented == _recorded_metric_names(monkeypatch)
    readme = (CLUSTER / "README.md").read_text()
    exprs = " ".join(t["expr"] for p in json.loads(DASHBOARD_JSON.read_text())["panels"] for t in p.get("targets", []))
    for name, kind in documented.items():
        assert f"`{name}`" in readme, name
        assert name in exprs or (kind == "histogram" and f"{name}_bucket" in exprs), name


# ------------------------------------------------------------------------------------- two-node local cluster
def _free_base_port() -> int:
    """A base port whose ~300-port block (see up.sh) is unused, below the ephemeral range."""
    for _ in range(50):
        base = random.randrange(20000, 32000, 10)
        ports = [*range(base, base + 18), base + 50, *range(base + 100, base + 300, 25)]
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    pytest.skip("no free port block for a local cluster")


def _state(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            for item in shlex.split(line.removeprefix("export ")):
                key, _, value = item.partition("=")
                out[key] = value
    return out


@pytest.mark.slow
def test_two_node_local_cluster_trains_tiny_pipeline_one_worker_per_node_into_s3(tmp_path):
    """up.sh -> `rnc pipeline run --address` (tiny preset, 2 DDP workers) -> checkpoints in S3, workers of every
    stage on both nodes -> down.sh stops every process it started. Uses its own ports and temp dirs: it cannot touch
    the test session's Ray (and never runs `ray stop`)."""
    import boto3
    from ray.util.state import list_actors, list_nodes

    venv_bin = str(Path(sys.executable).parent)
    if not (shutil.which("ray", path=venv_bin) and shutil.which("moto_server", path=venv_bin)):
        pytest.skip("needs ray and moto_server (moto[server]) next to the test interpreter")
    base = _free_base_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        RNC_BASE_PORT=str(base),
        RNC_DASHBOARD_PORT=str(base + 50),
        RNC_LOCAL_DIR=str(tmp_path / "local"),
        RAY_BIN=f"{venv_bin}/ray",
        PYTHON=sys.executable,
        MOTO_SERVER=f"{venv_bin}/moto_server",
        PATH=f"{venv_bin}:{env.get('PATH', '')}",
        WANDB_MODE="disabled",
        HF_DATASETS_OFFLINE="1",
        RNC_STOP_GRACE_S="15",
    )
    t0 = time.perf_counter()
    up = subprocess.run(["bash", str(LOCAL / "up.sh")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    state_file = tmp_path / "local" / "state.env"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = _state(state_file)
        t_up = time.perf_counter() - t0
        nodes = list_nodes(address=state["RNC_DASHBOARD_URL"], filters=[("state", "=", "ALIVE")])
        assert len(nodes) == 2
        run_env = {**env, **state}
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "rnc",
                "pipeline",
                "run",
                "--config",
                str(LOCAL / "pipeline-tiny-2node.yaml"),
                "--address",
                state["RAY_ADDRESS"],
                "--storage",
                f"s3://{state['RNC_BUCKET']}/runs",
                "--storage-endpoint",
                state["RNC_S3_ENDPOINT"],
            ],
            env=run_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        t_run = time.perf_counter() - t0 - t_up

        # Checkpoints of every training stage (complete: manifest written last) and the report are in S3.
        s3 = boto3.client(
            "s3",
            endpoint_url=state["RNC_S3_ENDPOINT"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=state["RNC_BUCKET"], Prefix="runs/tiny-2node/")
        keys = {o["Key"] for page in pages for o in page.get("Contents", [])}
        for stage in ("pretrain", "mid", "sft"):
            for name in ("manifest.json", "model.safetensors", "config.json", "meta.json"):
                assert f"runs/tiny-2node/{stage}/step_000006/{name}" in keys, (stage, name)
        assert "runs/tiny-2node/pipeline.json" in keys and "runs/tiny-2node/eval/report_card.md" in keys
        manifest = json.loads(
            s3.get_object(Bucket=state["RNC_BUCKET"], Key="runs/tiny-2node/pipeline.json")["Body"].read()
        )
        assert "finished" in json.dumps(manifest)

        # Each stage's two DDP workers ran on the two different nodes.
        workers = list_actors(
            address=state["RNC_DASHBOARD_URL"],
            filters=[("class_name", "=", "RayTrainWorker")],
            detail=True,
            limit=1000,
            raise_on_missing_output=False,
        )
        assert len(workers) == 6, [(w.node_id, w.state) for w in workers]  # 3 stages x 2 workers
        assert {w.node_id for w in workers} == {n.node_id for n in nodes}
        print(f"\ntwo-node cluster: up {t_up:.0f}s, tiny pipeline {t_run:.0f}s")
    finally:
        if state_file.exists():
            pgids = [int(v) for k, v in _state(state_file).items() if k.endswith("_PID")]
            down = subprocess.run(
                ["bash", str(LOCAL / "down.sh"), "--purge"], env=env, capture_output=True, text=True, timeout=120
            )
            assert down.returncode == 0, down.stdout + down.stderr
            for pgid in pgids:
                with pytest.raises(ProcessLookupError):
                    os.killpg(pgid, 0)
