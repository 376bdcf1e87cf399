"""deploy/k8s cannot run here (no cluster): render the base and every overlay with
`kubectl kustomize` and check that they are valid and mean what they say — every core
object validates against the Kubernetes schemas, KEDA's objects against KEDA's CRDs,
every voicebus command parses, every setting is a real config key, the KEDA triggers
read the streams and groups the code uses as a user the ACL lets, grace periods cover
``worker.shutdown_grace_s``, and the readiness/liveness probe says what it should about
a real worker on a real Redis with the ACL the manifests build."""

from __future__ import annotations

import ast
import base64
import copy
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT, WorkerProcs, wait_for
from voicebus.cli import _parser
from voicebus.redis_server import EmbeddedRedis
from workers import stages
from workers.config import Config
from workers.config_load import load_config
from workers.runtime.keys import Keys

K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUBECTL = shutil.which("kubectl")
# The oldest Kubernetes the manifests are meant for, and the newest schemas bundled.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Environment variables that are not voicebus config keys, and why they are there.
OTHER_ENV = {
    "VOICEBUS_CONFIG": "where the ConfigMap's config.yaml is mounted",
    "VOICEBUS_CACHE": "the model cache (an emptyDir)",
    "REDIS_USER": "the pod's ACL user, spliced into REDIS_URL",
    "REDIS_PASSWORD": "its password from the Secret, spliced into REDIS_URL",
    "REDIS_SCHEME": "redis or redis+cluster, from the ConfigMap voicebus-redis, for REDIS_URL",
    "REDIS_ADDRESS": "host:port[/db] of Redis, from the ConfigMap voicebus-redis, for REDIS_URL",
    "N_GPU_LAYERS": "llama-cpp-python server's ModelSettings (GPU overlay)",
}
# Every metadata key KEDA's redis-streams scaler reads (pkg/scalers/redis_streams_scaler.go
# and redis_scaler.go's connection info, KEDA v2.20).
KEDA_REDIS_STREAMS_KEYS = {
    "address", "addresses", "host", "hosts", "port", "ports", "addressFromEnv", "hostFromEnv",
    "portFromEnv", "usernameFromEnv", "passwordFromEnv", "username", "password", "stream",
    "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
    "databaseIndex", "enableTLS", "unsafeSsl",
}

Doc = dict[str, Any]


def render(path: Path) -> list[Doc]:
    if KUBECTL is None:
        reason = "kubectl is not installed: deploy/k8s cannot be rendered"
        print(reason)
        pytest.skip(reason)
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module", params=[BASE, *OVERLAYS], ids=lambda p: p.name)
def rendered(request: pytest.FixtureRequest) -> list[Doc]:
    return render(request.param)


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def secret_value(docs: list[Doc], name: str, key: str) -> str:
    secret = one(docs, "Secret", name)
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def voicebus_containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, container) for every container running the voicebus image."""
    for workload in find(docs, "Deployment") + find(docs, "StatefulSet"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if container["image"].split(":")[0].split("/")[-1] == "voicebus":
                yield workload, container


def resolved_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The container's environment as the kubelet builds it: values, Secret and
    ConfigMap references, and $(VAR) references to variables defined before."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):  # first: env entries may refer to these
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), str(item["value"]))
        else:
            ref = item["valueFrom"]
            if "secretKeyRef" in ref:
                value = secret_value(docs, ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
            else:
                cm = one(docs, "ConfigMap", ref["configMapKeyRef"]["name"])
                value = cm["data"][ref["configMapKeyRef"]["key"]]
        env[item["name"]] = value
    return env


def container_config(docs: list[Doc], workload: Doc, container: Doc,
                     tmp: Path) -> tuple[Config, dict[str, str]]:
    """The configuration the container loads: the mounted ConfigMap's file + its env."""
    env = resolved_env(docs, container)
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    config_path = Path(env["VOICEBUS_CONFIG"])
    volume = volumes[mounts[str(config_path.parent)]]
    data = one(docs, "ConfigMap", volume["configMap"]["name"])["data"]
    local = tmp / f"{workload['metadata']['name']}-{config_path.name}"
    local.write_text(data[config_path.name])
    return load_config(local, env={k: v for k, v in env.items() if k != "VOICEBUS_CONFIG"}), env


def acl_users(text: str) -> dict[str, tuple[str, str]]:
    """user -> (password, the rest of its rule) of an ACL file."""
    users = {}
    for line in text.splitlines():
        m = re.match(r"^user (\S+) (on|off)(?: >(\S+))?(.*)$", line)
        assert m, line
        users[m[1]] = (m[3] or "", f"{m[2]}{m[4]}")
    return users


def stage_slots(config: Config, stage: str) -> int:
    """Jobs one process of a job stage takes at once (JobWorker.free)."""
    return config.asr.concurrency if stage == "asr" else config.worker.concurrency


# -- schemas ---------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_core_object_validates_against_the_kubernetes_schemas(
        rendered: list[Doc], version: str) -> None:
    core = [d for d in rendered if not d["apiVersion"].startswith("keda.sh/")]
    assert len(find(core, "Deployment")) == 6 and len(core) >= 15  # it rendered them all
    for doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({version}): "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")


def _strict(schema: Any) -> Any:
    """A CRD's structural schema with unknown fields refused (Kubernetes would prune
    them silently: a misspelt field would just do nothing)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (schema.get("type") == "object" and "properties" in schema
                and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def test_keda_objects_validate_against_kedas_crds(rendered: list[Doc]) -> None:
    schemas = {}
    for path in (K8S / "crds" / "keda").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = _strict(version["schema"]["openAPIV3Schema"])
    keda = [d for d in rendered if d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in keda} == {"ScaledObject", "TriggerAuthentication"}
    for doc in keda:
        schema = schemas[(doc["apiVersion"], doc["kind"])]
        try:
            jsonschema.validate(copy.deepcopy(doc), schema)
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")


# -- what the containers run -----------------------------------------------------------
def test_every_container_runs_a_real_command_with_real_settings(
        rendered: list[Doc], tmp_path: Path) -> None:
    acl = acl_users((ROOT / "deploy" / "redis-users.acl").read_text())
    found = {}
    redis_seen = set()
    for workload, container in voicebus_containers(rendered):
        name = workload["metadata"]["name"]
        assert "command" not in container, "the image's ENTRYPOINT is voicebus"
        args = _parser().parse_args(container["args"])  # exits on an unknown command
        config, env = container_config(rendered, workload, container, tmp_path)
        for var in env:
            if not var.startswith("VOICEBUS_") or var in OTHER_ENV:
                assert var in OTHER_ENV or var in ("REDIS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"), (
                    f"{name}: {var} is neither a config key nor a known variable")
        if "N_GPU_LAYERS" in env:
            settings = pytest.importorskip("llama_cpp.server.settings")
            assert "n_gpu_layers" in settings.ModelSettings.model_fields
            assert args.command == "llm-server"
        if args.command == "up":  # one worker under its supervisor (see the README)
            assert len(args.only) == 1 and args.only[0] in stages.NAMES and args.no_standby
            args.stage = args.only[0]
        found[name] = (args.command, getattr(args, "stage", None))
        if args.command == "llm-server":
            assert config.llm.local.host == "0.0.0.0"
            ports = {p["containerPort"] for p in container["ports"]}
            assert ports == {config.llm.local.port}
            continue
        # Its own ACL user, with the password the Redis pod's ACL file gets.
        url = urlsplit(config.redis.url or "")
        user = "gateway" if args.command == "gateway" else args.stage
        assert user in acl and url.username == user, name
        assert url.password == secret_value(rendered, "voicebus-redis-users", user), name
        assert url.scheme in ("redis", "redis+cluster")
        assert str(url.hostname).endswith(".voicebus.svc") and url.port == 6379
        if url.scheme == "redis":  # the base's own Redis, database 0
            assert url.hostname == "redis.voicebus.svc" and url.path == "/0"
            assert find(rendered, "StatefulSet", "redis")
        else:  # a cluster has no databases, and runs outside this deployment
            assert url.path == "" and not find(rendered, "StatefulSet", "redis")
        # Producers and consumers must agree on where Redis is and on the queue shards.
        redis_seen.add((url.scheme, url.hostname, url.port, config.redis.queue_shards))
        service = one(rendered, "Service", "llm-server")
        assert config.llm.base_url == (f"http://{service['metadata']['name']}:"
                                       f"{service['spec']['ports'][0]['port']}/v1")
        if args.command == "gateway":
            assert config.gateway.host == "0.0.0.0"
            assert {p["containerPort"] for p in container["ports"]} == {config.gateway.port}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"]
                          if v["name"] == mounts[str(Path(config.gateway.secret_file).parent)])
            key = Path(config.gateway.secret_file).name
            assert len(secret_value(rendered, volume["secret"]["secretName"], key)) >= 16
    assert len(redis_seen) == 1, redis_seen
    assert found == {"llm-server": ("llm-server", None), "vad": ("up", "vad"),
                     "asr": ("up", "asr"), "llm": ("up", "llm"),
                     "tts": ("up", "tts"), "gateway": ("gateway", None)}
    assert set(stages.NAMES) <= set(found)


def test_the_gpu_overlay_switches_asr_tts_and_the_llm_server_to_the_gpu(
        tmp_path: Path) -> None:
    docs = render(K8S / "overlays" / "gpu")
    on_gpu = set()
    for workload, container in voicebus_containers(docs):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        config, env = container_config(docs, workload, container, tmp_path)
        if gpus is None:
            assert "nodeSelector" not in pod and config.asr.device == config.tts.device == "cpu"
            continue
        on_gpu.add(name)
        assert gpus == 1 and pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists",
                "effect": "NoSchedule"} in pod["tolerations"]
        assert container["image"].endswith(":gpu")
        if name == "asr":
            assert (config.asr.device, config.asr.compute_type) == ("cuda", "int8_float16")
        if name == "tts":
            assert config.tts.device == "cuda"
        if name == "llm-server":
            assert env["N_GPU_LAYERS"] == "-1"
    assert on_gpu == {"asr", "tts", "llm-server"}


# -- autoscaling -----------------------------------------------------------------------
def test_keda_triggers_read_the_real_streams_and_groups(
        rendered: list[Doc], tmp_path: Path) -> None:
    acl = acl_users((ROOT / "deploy" / "redis-users.acl").read_text())
    configs = stage_configs(rendered, tmp_path)
    scaled = {d["metadata"]["name"]: d for d in find(rendered, "ScaledObject")}
    assert set(scaled) == {*stages.NAMES, "llm-server"}
    for name, obj in scaled.items():
        spec = obj["spec"]
        target = one(rendered, "Deployment", spec["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], f"{name}: KEDA owns the replica count"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        stage = scaled_stage(name)
        config = configs[stage]
        keys = Keys.of(config.redis)
        redis_url = urlsplit(config.redis.url or "")
        on_cluster = redis_url.scheme == "redis+cluster"
        measured = set()
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == ("redis-cluster-streams" if on_cluster else "redis-streams")
            assert set(meta) <= KEDA_REDIS_STREAMS_KEYS, set(meta) - KEDA_REDIS_STREAMS_KEYS
            assert meta["consumerGroup"] == stage  # Worker.group is the stage's name
            address = meta["addresses"] if on_cluster else meta["address"]
            assert address == f"{redis_url.hostname}:{redis_url.port}"
            if not on_cluster:
                assert int(meta.get("databaseIndex", "0")) == int(redis_url.path.strip("/") or 0)
            auth = one(rendered, "TriggerAuthentication", trigger["authenticationRef"]["name"])
            params = {r["parameter"]: secret_value(rendered, r["name"], r["key"])
                      for r in auth["spec"]["secretTargetRef"]}
            _, rule = acl[params["username"]]
            assert params["username"] == "operator" and rule.startswith("on")
            assert "+@stream" in rule and "+info" in rule and "~vb:*" in rule
            assert params["password"] == secret_value(rendered, "voicebus-redis-users", "operator")
            assert "streamLength" not in meta
            measured.add((trigger_kind(trigger), meta["stream"]))
        # Every shard the workers read, once for each thing measured, and nothing else.
        streams = [keys.sessions()] if stage == "vad" else keys.queues(stage)
        kinds = ["pending"] if name == "llm-server" else ["pending", "lag"]
        assert len(measured) == len(spec["triggers"]), f"{name}: a stream measured twice"
        assert measured == {(k, s) for k in kinds for s in streams}, name


def test_replicas_follow_the_work_in_progress_plus_the_work_waiting(
        rendered: list[Doc], tmp_path: Path) -> None:
    """Each ScaledObject's formula sums its triggers (every shard), over a target of the
    work one pod takes. Busy and waiting add up: with a trigger each, the HPA took the
    larger, so two busy ASR pods and one waiting job asked for 2 pods and the job
    waited; the sum asks for 3."""
    configs = stage_configs(rendered, tmp_path)
    rng = random.Random(15)
    for obj in find(rendered, "ScaledObject"):
        name = obj["metadata"]["name"]
        stage = scaled_stage(name)
        config = configs[stage]
        modifiers = obj["spec"]["advanced"]["scalingModifiers"]
        assert modifiers["metricType"] == "AverageValue"  # desired = ceil(value / target)
        target = float(modifiers["target"])
        for _ in range(20):
            values = {t["name"]: rng.randrange(0, 30) for t in obj["spec"]["triggers"]}
            busy = sum(values[t["name"]] for t in obj["spec"]["triggers"]
                       if trigger_kind(t) == "pending")
            waiting = sum(values[t["name"]] for t in obj["spec"]["triggers"]
                          if trigger_kind(t) == "lag")
            assert formula_value(modifiers["formula"], values) == busy + waiting, name
        if name == "vad":  # live sessions per worker, below the hard cap
            assert 1 <= target <= config.worker.max_sessions
        elif name == "llm-server":  # one reply generating, one queued (to be measured)
            assert target == 2
        else:
            assert target == stage_slots(config, stage), name
    asr = one(rendered, "ScaledObject", "asr")
    shard0 = {trigger_kind(t): t["name"] for t in asr["spec"]["triggers"]
              if t["metadata"]["stream"] == "vb:q:asr"}
    values = {t["name"]: 0 for t in asr["spec"]["triggers"]}
    values[shard0["pending"]], values[shard0["lag"]] = 2, 1
    modifiers = asr["spec"]["advanced"]["scalingModifiers"]
    assert math.ceil(formula_value(modifiers["formula"], values)
                     / float(modifiers["target"])) == 3


def stage_configs(docs: list[Doc], tmp: Path) -> dict[str, Config]:
    return {w["metadata"]["name"]: container_config(docs, w, c, tmp)[0]
            for w, c in voicebus_containers(docs)}


def scaled_stage(scaled_object: str) -> str:
    """The stage whose group a ScaledObject reads: its target's own, or for the LLM
    server the llm stage, whose jobs are its requests."""
    return "llm" if scaled_object == "llm-server" else scaled_object


def trigger_kind(trigger: Doc) -> str:
    """pending (XPENDING: delivered, not acked) or lag (XINFO GROUPS: not yet read)."""
    return "lag" if "lagCount" in trigger["metadata"] else "pending"


def formula_value(formula: str, values: dict[str, int]) -> int:
    """A scalingModifiers formula (expr-lang) made of trigger names, numbers, + and *:
    evaluated from its syntax tree, and anything else in it fails the test."""
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"not a sum of trigger values: {ast.dump(node)}")
    return value(ast.parse(formula, mode="eval").body)


def test_the_sessions_a_vad_worker_holds_are_capped_where_measured(
        rendered: list[Doc], tmp_path: Path) -> None:
    workload, container = next((w, c) for w, c in voicebus_containers(rendered)
                               if w["metadata"]["name"] == "vad")
    config, _ = container_config(rendered, workload, container, tmp_path)
    assert config.worker.max_sessions == 25  # NOTES.md issue 6: 25 sessions, borderline


# -- lifecycle -------------------------------------------------------------------------
def _prestop_s(container: Doc) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if command is None:
        return 0.0
    assert command[0] == "sleep", command
    return float(command[1])


def test_grace_periods_cover_the_configured_shutdown(
        rendered: list[Doc], tmp_path: Path) -> None:
    for workload, container in voicebus_containers(rendered):
        name = workload["metadata"]["name"]
        config, _ = container_config(rendered, workload, container, tmp_path)
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        needed = _prestop_s(container) + config.worker.shutdown_grace_s
        # Room to hand the rest back after the drain, but not so much that a stuck pod
        # holds its sessions for long (peers take them when its heartbeat stops).
        assert needed + 1 <= grace <= needed + 10, (name, grace, needed)
        assert workload["spec"]["strategy"]["rollingUpdate"] == {
            "maxSurge": 1, "maxUnavailable": 0}
        if name in ("gateway", "llm-server"):  # behind a Service: leave it before SIGTERM
            assert _prestop_s(container) >= 5
        if name == "llm-server":
            startup = container["startupProbe"]
            window = startup["periodSeconds"] * startup["failureThreshold"]
            assert window >= config.llm.local.startup_timeout
    for pdb in find(rendered, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        targets = [d for d in find(rendered, "Deployment")
                   if d["spec"]["selector"]["matchLabels"] == selector]
        assert len(targets) == 1 and pdb["spec"]["maxUnavailable"] == 1
    assert {p["metadata"]["name"] for p in find(rendered, "PodDisruptionBudget")} == {
        d["metadata"]["name"] for d in find(rendered, "Deployment")}


def test_every_probe_runs_voicebus_probe_for_its_own_stage(rendered: list[Doc]) -> None:
    for workload, container in voicebus_containers(rendered):
        name = workload["metadata"]["name"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container.get(kind, {}).get("exec", {}).get("command")
            if command is None:
                continue
            assert command[:2] == ["voicebus", "probe"], (name, kind)
            args = _parser().parse_args(command[1:])  # a command the CLI has
            mode = "live" if kind == "livenessProbe" else "ready"
            assert (args.mode, args.stage) == (mode, name), (name, kind)
        if name in stages.NAMES:
            assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)


# -- the ACL the Redis pod builds, and the probe on a real Redis ------------------------
def build_acl(docs: list[Doc], tmp: Path) -> Path:
    """Run the Redis pod's init container script on the rendered ConfigMap and Secret."""
    redis = one(docs, "StatefulSet", "redis")
    init = redis["spec"]["template"]["spec"]["initContainers"][0]
    template = tmp / "template.acl"
    template.write_text(one(docs, "ConfigMap", next(
        c["metadata"]["name"] for c in find(docs, "ConfigMap")
        if "users.acl" in c.get("data", {})))["data"]["users.acl"])
    passwords = tmp / "passwords"
    passwords.mkdir()
    secret = one(docs, "Secret", "voicebus-redis-users")
    for key in secret["data"]:
        (passwords / key).write_text(secret_value(docs, "voicebus-redis-users", key))
    out = tmp / "users.acl"
    subprocess.run([*init["command"], init["args"][0]], check=True, timeout=30, env={
        **os.environ, "ACL_TEMPLATE": str(template), "PASSWORDS_DIR": str(passwords),
        "ACL_OUT": str(out)})
    return out


def test_the_redis_acl_is_the_deploy_acl_with_the_secrets_passwords(tmp_path: Path) -> None:
    docs = render(BASE)
    assert (BASE / "redis-users.acl").read_text() == (
        ROOT / "deploy" / "redis-users.acl").read_text(), "copy deploy/redis-users.acl here"
    original = acl_users((ROOT / "deploy" / "redis-users.acl").read_text())
    built = acl_users(build_acl(docs, tmp_path).read_text())
    assert set(built) == set(original)
    for user, (password, rule) in built.items():
        assert rule == original[user][1], user
        if user != "default":
            assert password == secret_value(docs, "voicebus-redis-users", user)


def probe(mode: str, stage: str, url: str) -> subprocess.CompletedProcess[str]:
    """``voicebus probe`` as the pods run it, with the base's config file."""
    return subprocess.run(
        [sys.executable, "-m", "voicebus", "probe", mode, stage], capture_output=True,
        text=True, timeout=30, cwd=ROOT, env={
            **os.environ, "REDIS_URL": url, "VOICEBUS_CONFIG": str(BASE / "config.yaml")})


@pytest.mark.bus
def test_the_probe_tells_a_worker_in_its_group_from_one_that_is_not(tmp_path: Path) -> None:
    docs = render(BASE)
    acl = build_acl(docs, tmp_path)

    def url(user: str, port: int) -> str:
        password = secret_value(docs, "voicebus-redis-users", user)
        return f"redis://{user}:{password}@127.0.0.1:{port}/0"

    with EmbeddedRedis(extra_args=["--aclfile", str(acl)]) as server:
        asr, vad = url("asr", server.port), url("vad", server.port)
        not_yet = probe("ready", "asr", asr)
        assert not_yet.returncode == 1 and "no live consumer" in not_yet.stderr
        assert probe("live", "asr", asr).returncode == 1
        procs = WorkerProcs(asr, "vb", tmp_path)
        try:
            worker = procs.start("slow-asr")
            wait_for(lambda: probe("ready", "asr", asr).returncode == 0, timeout=20,
                     what="ready once the worker is in its group")
            assert probe("live", "asr", asr).returncode == 0
            assert probe("ready", "vad", vad).returncode == 1  # no VAD worker here
            procs.url = vad
            procs.start("echo-session")
            wait_for(lambda: probe("ready", "vad", vad).returncode == 0, timeout=20,
                     what="the VAD worker in its group on the sessions stream")
            worker.send_signal(signal.SIGKILL)  # consumer stays; its heartbeat expires
            worker.wait()
            wait_for(lambda: probe("ready", "asr", asr).returncode == 1, timeout=20,
                     what="not ready once the heartbeat is gone")
            assert probe("live", "asr", asr).returncode == 1
        finally:
            procs.stop_all()
        port = server.port
    # Redis gone: not ready, but alive (restarting the pod would not bring Redis back).
    gone = url("asr", port)
    assert probe("ready", "asr", gone).returncode == 1
    assert probe("live", "asr", gone).returncode == 0
    assert probe("ready", "gateway", gone).returncode == 1


def test_resource_requests_and_scaling_numbers_are_explained() -> None:
    """Each number in the manifests is tied to its source in deploy/k8s/README.md."""
    readme = (K8S / "README.md").read_text()
    for needle in ("NOTES.md", "shutdown_grace_s", "pendingEntriesCount", "lagCount",
                   "cooldownPeriod", "stabilizationWindowSeconds", "to be measured"):
        assert needle in readme, needle
