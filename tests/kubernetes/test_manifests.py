"""The Kubernetes manifests (docker/kubernetes/), rendered and checked without a cluster.

Both overlays are rendered with `kubectl kustomize` (the kubectl on these machines' image), every
core object is validated with kubernetes-validate against the OpenAPI schemas of Kubernetes
:data:`KUBERNETES_VERSION` in strict mode (unknown fields are errors), and then checked against
the project as tests/deploy checks the compose file: each container's command through the real
entry points, each SMOOTHCERT_* name against the Settings fields, the Secrets' keys against the
documented command that creates them. KEDA's ScaledObject has no schema there; its fields are
checked by hand.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import kubernetes_validate
import pytest
from ruamel.yaml import YAML

from smoothcert.service.core.settings import Settings
from tests.deploy.test_compose import api_command, effective_worker_options, load_compose
from tests.support.paths import ROOT

KUBERNETES = ROOT / "docker" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
REDIS_CLIENTS = {"api", "certify-worker", "trainer"}
SECRETS = {"smoothcert-keys", "smoothcert-redis"}


def render(overlay: str) -> list[dict]:
    done = subprocess.run(
        [KUBECTL, "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"kubectl kustomize {overlay}: {done.stderr.strip()}"
    return [d for d in YAML(typ="safe").load_all(done.stdout) if d]


# Ids other than "gpu", the keyword of tests that need a CUDA device (tests/conftest.py skips them).
@pytest.fixture(scope="module", params=OVERLAYS, ids=[f"{o}-overlay" for o in OVERLAYS])
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def one(docs: list[dict], kind: str, name: str) -> dict:
    return objects(docs, kind)[name]


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """Deployment and StatefulSet names to their pod templates."""
    return {
        d["metadata"]["name"]: d["spec"]["template"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }


def container(docs: list[dict], workload: str) -> dict:
    [main, *_] = pod_templates(docs)[workload]["spec"]["containers"]
    return main


def settings_of(docs: list[dict]) -> dict[str, str]:
    [config] = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("smoothcert-settings")
    ]
    return config["data"]


def env_names(docs: list[dict], workload: str) -> set[str]:
    """Every environment variable name the workload's main container gets."""
    main = container(docs, workload)
    names = {e["name"] for e in main.get("env", [])}
    for source in main.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(settings_of(docs))
        if "secretRef" in source:
            names |= documented_secret_keys()[source["secretRef"]["name"]]
    return names


def documented_secret_keys() -> dict[str, set[str]]:
    """The keys each Secret gets from the `kubectl create secret` command in the README."""
    text = (KUBERNETES / "README.md").read_text(encoding="utf-8")
    found: dict[str, set[str]] = {}
    for name, body in re.findall(
        r"create secret generic (\S+)((?:\s*\\\n\s*--from-literal=\S+)+)", text
    ):
        found[name] = set(re.findall(r"--from-literal=([A-Z_]+)=", body))
    return found


FIELDS = {f"SMOOTHCERT_{name.upper()}" for name in Settings.model_fields}


# --- the schema --------------------------------------------------------------------------------


def schema_errors(doc: dict) -> str | None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{doc['kind']} {doc['metadata']['name']}: {exc.message}"
    return None


def test_every_core_object_validates(overlay):
    _, docs = overlay
    core = [d for d in docs if not d["apiVersion"].startswith("keda.sh/")]
    assert len(core) == len(docs) - 1, "one object outside the core API: KEDA's ScaledObject"
    assert [e for e in map(schema_errors, core) if e] == []


def test_the_validation_catches_mistakes(overlay):
    _, docs = overlay
    api = copy.deepcopy(one(docs, "Deployment", "api"))
    api["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {}}
    assert "readinesProbe" in (schema_errors(api) or "")
    pdb = copy.deepcopy(one(docs, "PodDisruptionBudget", "api"))
    pdb["spec"]["minAvailable"] = [2]
    assert schema_errors(pdb)


# --- the API -----------------------------------------------------------------------------------


def test_api_runs_the_image_command_with_probes_a_service_and_a_budget(overlay):
    _, docs = overlay
    api = one(docs, "Deployment", "api")
    assert api["spec"]["replicas"] >= 2
    main = container(docs, "api")
    assert main["command"] == api_command(), "the API image's command, as `smoothcert up` runs it"
    port = int(main["command"][main["command"].index("--port") + 1])
    [http] = main["ports"]
    assert http["containerPort"] == port
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {
        main["readinessProbe"]["httpGet"]["port"],
        main["livenessProbe"]["httpGet"]["port"],
    } == {http["name"]}
    labels = api["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service", "api")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == http["name"]
    budget = one(docs, "PodDisruptionBudget", "api")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= budget["spec"]["minAvailable"] < api["spec"]["replicas"], "a drain can proceed"


# --- workers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("workload, queue", [("certify-worker", "certify"), ("trainer", "train")])
def test_worker_commands_run_a_declared_queue(overlay, workload, queue, monkeypatch):
    _, docs = overlay
    main = container(docs, workload)
    assert "command" not in main, "the image's entrypoint stays (it runs the arguments)"
    options = effective_worker_options(main["args"], monkeypatch)
    assert options["queues"] == [queue]
    assert options["concurrency"] == 1, "one process per GPU"


def test_gpus_one_per_worker_in_the_gpu_overlay_and_none_in_the_cpu_overlay(overlay):
    name, docs = overlay
    for workload in ("certify-worker", "trainer"):
        main = container(docs, workload)
        env = {e["name"]: e.get("value") for e in main.get("env", [])}
        limits = main["resources"].get("limits", {})
        if name == "gpu":
            assert str(limits["nvidia.com/gpu"]) == "1", workload
            assert env["CUDA_VISIBLE_DEVICES"] == "0", "the one GPU the device plugin shows"
        else:
            assert "nvidia.com/gpu" not in limits and env["SMOOTHCERT_DEVICE"] == "cpu"
            assert container(docs, workload)["image"].endswith(":cpu")
    for workload in ("api", "redis", "sentinel"):
        assert "nvidia.com/gpu" not in str(container(docs, workload)["resources"])


def test_grace_period_covers_the_cold_shutdown(overlay):
    _, docs = overlay
    compose = load_compose()["services"]
    heartbeat_ttl = Settings.model_fields["worker_heartbeat_ttl_s"].default
    for workload, service in (("certify-worker", "worker"), ("trainer", "trainer")):
        grace = pod_templates(docs)[workload]["spec"]["terminationGracePeriodSeconds"]
        assert f"{grace}s" == compose[service]["stop_grace_period"]
        assert grace > 2 * heartbeat_ttl


# --- settings and secrets ----------------------------------------------------------------------


def test_every_smoothcert_name_is_a_settings_field(overlay):
    _, docs = overlay
    for workload in pod_templates(docs):
        names = {n for n in env_names(docs, workload) if n.startswith("SMOOTHCERT_")}
        assert sorted(names - FIELDS) == [], workload
    for keys in documented_secret_keys().values():
        assert keys <= FIELDS


def test_the_settings_start_in_production_with_the_secrets(overlay):
    _, docs = overlay
    values = dict(settings_of(docs))
    assert values["SMOOTHCERT_ENV"] == "production"
    secrets = {
        k: f"{k.lower()}-" + "x" * 16 for keys in documented_secret_keys().values() for k in keys
    }
    environ = {k.removeprefix("SMOOTHCERT_").lower(): v for k, v in {**values, **secrets}.items()}
    settings = Settings(**environ)
    assert str(settings.data_dir) == values["SMOOTHCERT_DATA_DIR"]
    # Every client asks the three sentinels for the primary, logging in with the secret password.
    assert len(settings.sentinels) == 3 and settings.redis_sentinel_password
    assert settings.redis_master_name == values["SMOOTHCERT_REDIS_MASTER_NAME"]
    with pytest.raises(ValueError, match="SMOOTHCERT_API_KEY"):
        Settings(**{k: v for k, v in environ.items() if k != "api_key"})


def test_secrets_are_referenced_never_written(overlay):
    _, docs = overlay
    assert objects(docs, "Secret") == {}, "secret values never in the manifests"
    assert set(documented_secret_keys()) == SECRETS
    text = str(docs)
    for name, keys in documented_secret_keys().items():
        for ref in re.findall(rf"'secretKeyRef': {{'name': '{name}', 'key': '([A-Z_]+)'}}", text):
            assert ref in keys
    referenced = set(re.findall(r"'(?:secretRef|secretKeyRef)': \{'name': '([^']+)'", text))
    assert referenced == SECRETS
    redis_env = str(pod_templates(docs)["redis"]) + str(pod_templates(docs)["sentinel"])
    assert "smoothcert-keys" not in redis_env, "Redis gets its passwords only"


# --- Redis, Sentinel, the network --------------------------------------------------------------


def test_sentinels_and_redis_agree_with_the_settings(overlay):
    _, docs = overlay
    values = settings_of(docs)
    sentinels = one(docs, "StatefulSet", "sentinel")
    service = sentinels["spec"]["serviceName"]
    [port] = container(docs, "sentinel")["ports"]
    expected = [
        f"sentinel-{i}.{service}:{port['containerPort']}"
        for i in range(sentinels["spec"]["replicas"])
    ]
    assert values["SMOOTHCERT_REDIS_SENTINELS"].split(",") == expected
    assert sentinels["spec"]["replicas"] >= 3, "a quorum survives one lost sentinel"
    redis = one(docs, "StatefulSet", "redis")
    assert redis["spec"]["replicas"] >= 2, "a replica to promote"
    assert container(docs, "redis")["image"] == load_compose()["services"]["redis"]["image"]
    script = (KUBERNETES / "base" / "redis-start.sh").read_text()
    assert "maxmemory $SMOOTHCERT_REDIS_MAXMEMORY" in script and "noeviction" in script
    assert "appendonly yes" in script
    sentinel_script = (KUBERNETES / "base" / "sentinel-start.sh").read_text()
    assert "sentinel monitor $SMOOTHCERT_REDIS_MASTER_NAME" in sentinel_script
    assert values["SMOOTHCERT_REDIS_MASTER_NAME"]


def admitted(docs: list[dict], source: dict, target_labels: dict, port: int) -> bool:
    """Whether the NetworkPolicies let pods labelled like ``source`` reach ``port`` on pods
    labelled ``target_labels`` (podSelector peers only; no policy selecting the target: open)."""

    def selects(selector: dict, labels: dict) -> bool:
        if not selector.get("matchLabels", {}).items() <= labels.items():
            return False
        for expr in selector.get("matchExpressions", []):
            if (labels.get(expr["key"]) in expr["values"]) != (expr["operator"] == "In"):
                return False
        return True

    policies = [
        p
        for p in objects(docs, "NetworkPolicy").values()
        if selects(p["spec"]["podSelector"], target_labels)
    ]
    if not policies:
        return True
    return any(
        any(selects(peer["podSelector"], source) for peer in rule.get("from", []))
        and any(p["port"] == port for p in rule.get("ports", []))
        for policy in policies
        for rule in policy["spec"].get("ingress") or []
    )


def test_only_the_api_and_the_workers_reach_redis(overlay):
    _, docs = overlay
    templates = pod_templates(docs)
    labels = {name: t["metadata"]["labels"] for name, t in templates.items()}
    for target, port in (("redis", 6379), ("sentinel", 26379)):
        reach = {name for name in templates if admitted(docs, labels[name], labels[target], port)}
        assert reach == REDIS_CLIENTS | {"redis", "sentinel"}, target
        assert not admitted(docs, {"app.kubernetes.io/name": "intruder"}, labels[target], port)
    for worker in ("certify-worker", "trainer"):
        assert not admitted(docs, labels["api"], labels[worker], 8000)


def test_one_read_write_many_volume_at_the_data_dir(overlay):
    _, docs = overlay
    [claim] = objects(docs, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    data_dir = settings_of(docs)["SMOOTHCERT_DATA_DIR"]
    for workload in REDIS_CLIENTS:
        volumes = {
            v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
            for v in pod_templates(docs)[workload]["spec"]["volumes"]
        }
        mounts = {m["mountPath"]: m["name"] for m in container(docs, workload)["volumeMounts"]}
        assert volumes[mounts[data_dir]] == claim["metadata"]["name"], workload


# --- KEDA --------------------------------------------------------------------------------------


def test_keda_scales_certify_workers_on_queued_plus_running(overlay):
    name, docs = overlay
    [scaler] = [d for d in docs if d["apiVersion"].startswith("keda.sh/")]
    assert scaler["apiVersion"] == "keda.sh/v1alpha1" and scaler["kind"] == "ScaledObject"
    spec = scaler["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] in objects(docs, "Deployment")
    assert container(docs, target["name"])["args"][-1] == "certify"
    assert spec["minReplicaCount"] >= 1, "/readyz wants a worker: never scale to zero"
    assert spec["maxReplicaCount"] >= spec["minReplicaCount"]
    assert spec["maxReplicaCount"] == (100 if name == "gpu" else 8)
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert 'smoothcert_queue_messages{queue="certify"}' in query
    assert "smoothcert_queue_unacked_messages" in query
    metrics = (ROOT / "service" / "api" / "metrics.py").read_text()
    for metric in re.findall(r"smoothcert_[a-z_]+", query):
        assert f'"{metric}"' in metrics, f"{metric} is not on /metrics"
    assert int(trigger["metadata"]["threshold"]) == 1, "one message per worker"
    allowed = {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "advanced",
        "triggers",
        "fallback",
        "idleReplicaCount",
    }
    assert set(spec) <= allowed
