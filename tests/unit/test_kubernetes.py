"""The Kubernetes manifests (deploy/kubernetes/) and the KServe InferenceService (deploy/kserve/), offline.

No cluster is needed (docs/kubernetes.md says what was and was not run on one):

- every core object validates with kubernetes-validate in strict mode (unknown fields fail) for
  every Kubernetes version we support; a schema it cannot find (an unknown kind or apiVersion
  for that version) is a failure, not a warning;
- every KServe object validates against ../shared/schemas/kserve made strict (an object that
  lists ``properties`` admits no other key), so a misspelled field fails: proven on a misspelled
  copy that the unmodified CRD schema accepts;
- the figures that exist elsewhere agree with their source: the image name (build-image.sh), the
  uid (Containerfile), the ports (config.properties), the probe paths and the startup budget
  (scripts/deploy/serve.py), the Secret and the key file (scripts/deploy/gateway.py), and the
  memory figures (scripts/ops/capacity.py's rule, model-config.yaml's workers,
  config.properties' JVM sizes);
- the Kustomization renders, with the kubectl on PATH (or $KUBECTL), exactly the objects that
  ``kubectl apply -f deploy/kubernetes/`` applies.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import yaml

from scripts.ops import capacity
from scripts.ops.tsclient import read_properties

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e .[dev] (kubernetes-validate)")

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
ISVC = REPO / "deploy" / "kserve" / "inferenceservice.yaml"
SCHEMAS = REPO.parent / "shared" / "schemas" / "kserve"
CONTAINERFILE = REPO / "deploy" / "container" / "Containerfile"
BUILD_IMAGE = REPO / "deploy" / "container" / "build-image.sh"
DOC = REPO / "docs" / "kubernetes.md"

# The Kubernetes versions docs/kubernetes.md says we support (autoscaling/v2 needs 1.23,
# PodDisruptionBudget.unhealthyPodEvictionPolicy 1.27 as beta-on-by-default).
SUPPORTED = [f"1.{minor}" for minor in range(27, 38)]
SECRET_KEY = "key_file.json"
# Keys the kustomize inside kubectl 1.14-1.20 (v2.0.3) knows at the top of a Kustomization.
KUSTOMIZE_V2_KEYS = {"apiVersion", "kind", "resources", "bases", "namespace", "namePrefix", "nameSuffix",
                     "commonLabels", "commonAnnotations", "patchesStrategicMerge", "patchesJson6902",
                     "configMapGenerator", "secretGenerator", "generatorOptions", "images", "vars", "crds"}
JVM_OVERHEAD_MIB = 256  # metaspace, code cache, thread stacks, GC structures beyond -Xmx and direct memory


# --- loading ---------------------------------------------------------------------------------------
def manifest_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml")) + sorted(K8S.glob("*.json"))


def core_objects() -> list[dict]:
    return [obj for path in manifest_files() for obj in yaml.safe_load_all(path.read_text()) if obj]


def one(kind: str, name: str | None = None) -> dict:
    found = [o for o in core_objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {K8S}, found {len(found)}"
    return found[0]


def isvc() -> dict:
    docs = [d for d in yaml.safe_load_all(ISVC.read_text()) if d]
    assert [d["kind"] for d in docs] == ["InferenceService"]
    return docs[0]


def pod_specs() -> dict[str, tuple[dict, dict]]:
    """(pod spec, serving container) of the Deployment and of the InferenceService's predictor."""
    dep = one("Deployment")["spec"]["template"]["spec"]
    pred = isvc()["spec"]["predictor"]
    assert len(dep["containers"]) == 1 and len(pred["containers"]) == 1
    return {"Deployment": (dep, dep["containers"][0]), "InferenceService": (pred, pred["containers"][0])}


# --- the sources of truth ---------------------------------------------------------------------------
def image_name() -> str:
    match = re.search(r"^IMAGE=\$\{IMAGE:-([^}]+)\}", BUILD_IMAGE.read_text(), re.M)
    assert match, f"no IMAGE=${{IMAGE:-...}} default in {BUILD_IMAGE}"
    return match.group(1)


def image_uid() -> int:
    match = re.search(r"useradd\b[^\n]*--uid\s+(\d+)", CONTAINERFILE.read_text())
    assert match, f"no useradd --uid in {CONTAINERFILE}"
    return int(match.group(1))


def image_env() -> dict[str, str]:
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV\s+(.*)$", text, re.M):
        env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def config_ports() -> dict[str, int]:
    props = read_properties(REPO / "config.properties")
    return {name: int(props[f"{name}_address"].rsplit(":", 1)[1]) for name in ("inference", "management", "metrics")}


def model_workers() -> int:
    config = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
    return max(int(config["minWorkers"]), int(config["maxWorkers"]))


def jvm_sizes_mib() -> tuple[int, int]:
    """-Xmx and -XX:MaxDirectMemorySize of config.properties' vmargs, in MiB."""
    vmargs = read_properties(REPO / "config.properties")["vmargs"]

    def mib(flag: str) -> int:
        match = re.search(rf"{re.escape(flag)}(\d+)([kmgKMG])", vmargs)
        assert match, f"{flag} not in vmargs {vmargs!r}"
        return int(match.group(1)) * {"k": 1 / 1024, "m": 1, "g": 1024}[match.group(2).lower()]

    return int(mib("-Xmx")), int(mib("-XX:MaxDirectMemorySize="))


def quantity_mib(value: str) -> float:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", str(value))
    assert match, f"memory quantity {value!r}: write it in Mi or Gi"
    return int(match.group(1)) * (1024 if match.group(2) == "Gi" else 1)


def ceil64(mib: float) -> int:
    return int(math.ceil(mib / 64) * 64)


def sizing() -> dict[str, float]:
    text = one("Deployment")["metadata"]["annotations"]["fashion-cnn/sizing"]
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", text)}


def startup_timeout_s() -> float:
    from scripts.deploy import serve

    return serve.get_args_parser().parse_args(["run"]).timeout


# --- (a) core objects: kubernetes-validate, strict, every supported version --------------------------
def validate_core(obj: dict, version: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning is a failure
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", SUPPORTED)
def test_every_core_object_validates_strictly(version):
    objects = core_objects()
    assert {o["kind"] for o in objects} >= {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler",
                                            "PodDisruptionBudget", "NetworkPolicy"}
    for obj in objects:
        try:
            validate_core(obj, version)
        except kubernetes_validate.SchemaNotFoundError as exc:  # what the CLI prints as a WARN
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_strict_core_validation_catches_a_misspelled_field():
    dep = copy.deepcopy(one("Deployment"))
    container = dep["spec"]["template"]["spec"]["containers"][0]
    container["readynessProbe"] = container.pop("readinessProbe")
    kubernetes_validate.validate(dep, SUPPORTED[-1], strict=False)  # the lax schema lets it through
    with pytest.raises(kubernetes_validate.ValidationError, match="readynessProbe"):
        validate_core(dep, SUPPORTED[-1])


def test_the_secret_users_create_validates_and_fits_the_pods(tmp_path):
    """The Secret from the documented command (kubectl when it is here, else the same object by hand)."""
    names = {spec_name: keys_volume(spec)["secret"]["secretName"] for spec_name, (spec, _) in pod_specs().items()}
    assert len(set(names.values())) == 1, f"the Deployment and the InferenceService use different Secrets: {names}"
    name = names["Deployment"]
    key_file = tmp_path / SECRET_KEY
    key_file.write_text(json.dumps({"inference": {"key": "x" * 43}, "management": {"key": "y" * 43},
                                    "feedback": {"key": "z" * 43}}))
    kubectl = kubectl_binary()
    if kubectl:
        out = subprocess.run([kubectl, "create", "secret", "generic", name, "-n", "fashion-cnn",
                              f"--from-file={SECRET_KEY}={key_file}", "--dry-run=client", "-o", "json"],
                             capture_output=True, text=True, env={**os.environ, "KUBECONFIG": os.devnull}, timeout=60)
        assert out.returncode == 0, out.stderr
        secret = json.loads(out.stdout)
        secret["metadata"].pop("creationTimestamp", None)  # null in a client-side object
    else:
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "fashion-cnn"},
                  "data": {SECRET_KEY: "e30K"}}
    for version in SUPPORTED:
        validate_core(secret, version)
    assert list(secret["data"]) == [SECRET_KEY]
    assert name in DOC.read_text() and f"--from-file={SECRET_KEY}" in DOC.read_text()


# --- (b) KServe objects: the CRD schema made strict ------------------------------------------------
def strict(schema):
    """A copy of an OpenAPI v3 CRD schema in which every object that lists properties admits no other."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def kserve_schema(kind: str) -> dict:
    path = SCHEMAS / {"InferenceService": "inferenceservice-v1beta1.json", "ServingRuntime": "servingruntime-v1alpha1.json"}[kind]
    if not path.exists():
        pytest.fail(f"{path} is missing: the KServe CRD schemas live in ../shared/schemas (beside the repository)")
    return json.loads(path.read_text())


def kserve_errors(obj: dict, schema: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
    # metadata is an open object in the CRD: check it as Kubernetes' ObjectMeta instead.
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    try:
        validate_core(probe, SUPPORTED[-1])
    except kubernetes_validate.ValidationError as exc:
        errors.append(f"metadata.{'.'.join(map(str, exc.path))}: {exc.message}")
    return errors


def test_the_inference_service_validates_against_the_strict_kserve_schema():
    obj = isvc()
    assert obj["apiVersion"] == "serving.kserve.io/v1beta1"
    assert kserve_errors(obj, strict(kserve_schema("InferenceService"))) == []


@pytest.mark.parametrize("where,good,bad", [
    (("spec", "predictor"), "scaleMetric", "scaleMetrc"),
    (("spec", "predictor", "containers", 0), "readinessProbe", "readinesProbe"),
    (("spec", "predictor", "containers", 0, "securityContext"), "readOnlyRootFilesystem", "readOnlyRootFileSystem"),
    (("metadata",), "annotations", "annotaions"),
])
def test_strict_kserve_schema_catches_a_misspelled_field(where, good, bad):
    obj = copy.deepcopy(isvc())
    node = obj
    for step in where:
        node = node[step]
    node[bad] = node.pop(good)
    lax, hard = kserve_schema("InferenceService"), strict(kserve_schema("InferenceService"))
    if where != ("metadata",):
        import jsonschema

        assert list(jsonschema.Draft7Validator(lax).iter_errors(obj)) == [], "the CRD's own schema already refuses it"
    errors = kserve_errors(obj, hard)
    assert any(bad in e for e in errors), errors


def test_protocol_v2_and_scaling_settings():
    pred = isvc()["spec"]["predictor"]
    assert pred["containers"][0]["name"] == "kserve-container"
    assert "protocolVersion" not in pred, "protocolVersion belongs to a model/runtime spec, not to custom containers"
    assert isvc()["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert 1 <= pred["minReplicas"] <= pred["maxReplicas"]
    assert pred["scaleMetric"] in ("cpu", "memory")  # what RawDeployment's HPA can scale on
    assert 0 < pred["scaleTarget"] <= 100


# --- (c) one source of truth -------------------------------------------------------------------------
def keys_volume(spec: dict) -> dict:
    found = [v for v in spec["volumes"] if "secret" in v]
    assert len(found) == 1, "exactly one Secret volume: the service credential"
    return found[0]


def mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def env(container: dict) -> dict[str, str]:
    """name -> value, or "secret:<name>/<key>" for a value from a Secret."""
    out = {}
    for e in container["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        out[e["name"]] = f"secret:{ref['name']}/{ref['key']}" if ref else e["value"]
    return out


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@pytest.mark.parametrize("which", ["Deployment", "InferenceService"])
def test_pod_agrees_with_the_image_and_config(which):
    spec, c = pod_specs()[which]
    ports = config_ports()
    image_env_ = image_env()

    assert c["image"] == image_name()
    assert c.get("imagePullPolicy") in ("IfNotPresent", "Never"), "a localhost/ image is loaded into nodes, not pulled"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == ports
    assert [p["containerPort"] for p in c["ports"]][0] == ports["inference"], "the first port carries inference"
    expose = sorted(int(p) for p in re.findall(r"^EXPOSE\s+(.*)$", CONTAINERFILE.read_text(), re.M)[0].split())
    assert sorted(ports.values()) == expose

    e = env(c)
    assert e["REPLICAS"] == "1", "one TorchServe per pod: scale with pods"
    assert e["GATEWAY_HOST"] == "0.0.0.0"
    assert e["GATEWAY_PORTS"] == ",".join(str(ports[n]) for n in ("inference", "management", "metrics"))
    assert e["GATEWAY_PORTS"] == image_env_["GATEWAY_PORTS"]
    # the feedback store: a PostgreSQL DSN from an optional Secret (serve.py reads FEEDBACK_STORE), else SQLite
    assert e["FEEDBACK_STORE"] == "secret:fashion-cnn-feedback-store/dsn"
    [store] = [x for x in c["env"] if x["name"] == "FEEDBACK_STORE"]
    assert store["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "FEEDBACK_STORE" in (REPO / "scripts" / "deploy" / "serve.py").read_text()

    # Security: the image's user, nothing more.
    uid = image_uid()
    assert spec["securityContext"]["runAsUser"] == uid and spec["securityContext"]["fsGroup"] == uid
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["runAsUser"] == uid and sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert spec.get("automountServiceAccountToken") is False

    # Writable places: every one the server writes is inside an emptyDir; the run folder is a
    # subfolder of its volume (serve run chmods it to 0700, which it cannot do on a volume's root).
    empty = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    writable = [path for path, m in mounts(c).items() if m["name"] in empty]
    for path in (e["SERVE_RUN_DIR"], e["SERVE_LOG_DIR"], e["TMPDIR"], "/tmp"):
        assert any(under(path, root) for root in writable), f"{path} is not on a writable volume"
    assert e["SERVE_RUN_DIR"] not in writable, "SERVE_RUN_DIR must be a folder inside the volume, not its root"
    assert any(under(e["SERVE_RUN_DIR"], root) for root in writable if under(image_env_["SERVE_RUN_DIR"], root))
    assert image_env_["SERVE_LOG_DIR"] in writable

    # The credential: KEY_FILE is the Secret's key file, mounted read-only.
    vol = keys_volume(spec)
    [mount] = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert mount.get("readOnly") is True
    assert [i["key"] for i in vol["secret"]["items"]] == [SECRET_KEY]
    assert e["KEY_FILE"] == f"{mount['mountPath']}/{vol['secret']['items'][0]['path']}"
    assert vol["secret"]["defaultMode"] & 0o007 == 0, "the key file must not be world-readable"
    assert vol["secret"]["defaultMode"] & 0o040, "group-readable: uid 10001 reads it through fsGroup"

    # Probes: startup long enough for the model load; readiness from a real prediction; liveness cheap.
    start, ready, live = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    assert start["httpGet"] == {"path": "/ping", "port": "inference"}
    assert start["periodSeconds"] * start["failureThreshold"] >= startup_timeout_s() + 30
    assert ready["httpGet"] == {"path": "/ping", "port": "inference"}
    assert ready["timeoutSeconds"] <= ready["periodSeconds"]
    assert live.get("tcpSocket") == {"port": "inference"} or live.get("httpGet", {}).get("path") == "/v2/health/live"
    assert live["periodSeconds"] * live["failureThreshold"] >= 60, "a busy pod must not be killed"
    assert spec["terminationGracePeriodSeconds"] >= 30 + 10, "the gateway's read timeout plus stopping"

    # Prometheus scraping: the metrics port.
    annotations = (one("Deployment")["spec"]["template"]["metadata"]["annotations"] if which == "Deployment"
                   else isvc()["metadata"]["annotations"])
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("which", ["Deployment", "InferenceService"])
def test_memory_is_sized_from_measured_rss_with_the_capacity_rule(which):
    _, c = pod_specs()[which]
    measured = sizing()
    workers = model_workers()
    heap, direct = jvm_sizes_mib()
    reserve = capacity.GATEWAY_RESERVE_MB
    request = quantity_mib(c["resources"]["requests"]["memory"])
    limit = quantity_mib(c["resources"]["limits"]["memory"])
    steady = workers * measured["worker_rss_mib"] + measured["frontend_rss_mib"] + reserve
    peak = workers * measured["worker_rss_mib"] + heap + direct + JVM_OVERHEAD_MIB + reserve
    assert request == ceil64(steady), f"request {request} Mi; the rule gives {steady} -> {ceil64(steady)} Mi"
    assert limit == ceil64(peak), f"limit {limit} Mi; the rule gives {peak} -> {ceil64(peak)} Mi"
    # The gateway derives its worker cap from the cgroup limit: it must allow the configured workers.
    cap = capacity.Capacity(worker_mb=measured["worker_rss_mib"], frontend_mb=measured["frontend_rss_mib"],
                            memory_mb=limit, cores=int(c["resources"]["requests"]["cpu"]), replicas=1).cap
    assert cap >= workers, f"the gateway would cap workers at {cap} < {workers} under a {limit} Mi limit"
    assert int(c["resources"]["requests"]["cpu"]) >= workers, "a core per worker (threads: auto)"
    # The figures are the ones the docs show.
    doc = DOC.read_text()
    for figure in (measured["worker_rss_mib"], measured["frontend_rss_mib"], request, limit):
        assert f"{figure:g}" in doc, f"{figure:g} is not in {DOC.name}"


def test_the_deployment_and_the_inference_service_run_the_same_pod():
    (dep, dc), (pred, pc) = pod_specs()["Deployment"], pod_specs()["InferenceService"]
    for key in ("securityContext", "volumes", "terminationGracePeriodSeconds", "automountServiceAccountToken"):
        assert dep[key] == pred[key], key
    for key in ("image", "imagePullPolicy", "env", "ports", "startupProbe", "readinessProbe", "livenessProbe",
                "lifecycle", "resources", "securityContext", "volumeMounts"):
        assert dc[key] == pc[key], key
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert {k: v for k, v in isvc()["metadata"]["annotations"].items() if k.startswith("prometheus.io/")} == annotations


def test_services_hpa_pdb_and_network_policy_point_at_the_pods():
    dep = one("Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = config_ports()
    container_ports = {p["name"]: p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    namespace = one("Namespace")["metadata"]["name"]
    assert all(o["metadata"].get("namespace") == namespace for o in core_objects() if o["kind"] != "Namespace")

    served = {}
    for svc in (o for o in core_objects() if o["kind"] == "Service"):
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
        for p in svc["spec"]["ports"]:
            assert container_ports[p["targetPort"]] == p["port"] == ports[p["name"]]
            served.setdefault(p["name"], []).append(svc["metadata"]["name"])
    assert set(served) == set(ports), "inference, management and metrics each have a Service port"
    assert served["metrics"] != served["inference"], "metrics on a Service of their own"

    hpa = one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    pods_metric = kinds["Pods"]["pods"]["metric"]["name"]
    assert pods_metric in DOC.read_text(), "the adapter rule that serves the Pods metric is documented"
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], "a drain must be able to evict one pod"
    assert dep["spec"]["replicas"] >= hpa["spec"]["minReplicas"]
    strategy = dep["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "rolling updates wait for a ready (predicting) pod"

    policy = one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    # egress: the PostgreSQL feedback store (port 5432, pods labelled for it) and the cluster DNS, nothing else
    egress = policy["spec"]["egress"]
    assert sorted((p["port"], p["protocol"]) for rule in egress for p in rule["ports"]) == \
        [(53, "TCP"), (53, "UDP"), (5432, "TCP")]
    assert all(rule.get("to") and all("podSelector" in t for t in rule["to"]) for rule in egress)
    admitted: dict[str, list] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "no rule admits every source"
        for p in rule["ports"]:
            name = p["port"] if isinstance(p["port"], str) else {v: k for k, v in container_ports.items()}[p["port"]]
            admitted.setdefault(name, []).extend(rule["from"])
    assert set(admitted) <= set(ports), f"only the gateway's ports: {sorted(admitted)}"
    assert admitted["metrics"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    for name in ("inference", "management"):
        assert all("namespaceSelector" in src and "monitoring" not in json.dumps(src) for src in admitted[name])


# --- rendering: kubectl apply -f and kubectl apply -k apply the same objects ------------------------------
def kubectl_binary() -> str | None:
    return os.environ.get("KUBECTL") or shutil.which("kubectl")


def test_the_kustomization_lists_every_manifest_with_fields_kubectl_1_20_knows():
    kustomization = K8S / "Kustomization"
    assert kustomization.exists()
    assert not (K8S / "kustomization.yaml").exists() and not (K8S / "kustomization.yml").exists(), \
        "a kustomization.yaml would be read by kubectl apply -f as an object and fail"
    data = yaml.safe_load(kustomization.read_text())
    assert set(data) <= KUSTOMIZE_V2_KEYS, f"fields kustomize v2.0.3 (kubectl 1.20) does not know: {set(data) - KUSTOMIZE_V2_KEYS}"
    assert data["resources"] == [p.name for p in manifest_files()]
    # kubectl apply -f applies files in name order: the Namespace must come first.
    assert core_objects()[0]["kind"] == "Namespace"


def test_kubectl_kustomize_renders_exactly_the_plain_manifests():
    kubectl = kubectl_binary()
    if not kubectl:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client, kubectl 1.20): "
                    "the Kustomization's fields are still checked by the test above")
    version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, timeout=60).stdout.strip()
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "KUBECONFIG": os.devnull})
    assert out.returncode == 0, f"{version}: {out.stderr}"
    rendered = [o for o in yaml.safe_load_all(out.stdout) if o]

    def key(o):
        return (o["kind"], o["metadata"]["name"])

    assert sorted(rendered, key=key) == sorted(core_objects(), key=key), f"rendered by {version}"


# --- the gateway with a read-only Secret ------------------------------------------------------------------
def test_a_valid_read_only_key_file_is_used_as_it_is(tmp_path, monkeypatch):
    from scripts.deploy import gateway

    keys = {kind: {"key": gateway.new_key()} for kind in ("inference", "management", "feedback")}
    key_file = tmp_path / SECRET_KEY
    key_file.write_text(json.dumps(keys))
    key_file.chmod(0o440)

    def refuse(*_):
        raise AssertionError("service_keys tried to write a key file mounted read-only")

    monkeypatch.setattr(gateway, "write_private", refuse)
    assert gateway.service_keys(key_file) == keys
    # a Secret made before the feedback key existed: used as it is (the gateway answers /feedback 503, saying why)
    older = {kind: keys[kind] for kind in ("inference", "management")}
    key_file.chmod(0o640)
    key_file.write_text(json.dumps(older))
    key_file.chmod(0o440)
    assert gateway.service_keys(key_file) == older
