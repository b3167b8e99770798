"""The Helm chart, rendered by Helm's own engine (helm-python-sdk), linted, and every manifest
validated against the Kubernetes schemas (kubernetes-validate --strict) and yamllint."""
import shutil
from pathlib import Path

import helm_python as helm
import kubernetes_validate as kv
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from service.settings import Settings
from sine_cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "sine-retrieval"
CI_VALUES = ROOT / "deploy" / "helm" / "ci"
TOKEN = {"eventsToken": "t0ken"}      # the chart refuses to leave POST /events open unasked
K8S_VERSION = "1.33.0"          # the Kubernetes version the manifests are validated against
CRDS = {"ServiceMonitor", "PrometheusRule"}   # not in the core schemas: checked by hand below
YAMLLINT = YamlLintConfig(file=str(ROOT / ".yamllint.yaml"))   # the project's own rules
VALUE_SETS = {"default": [], "gpu": ["gpu-values.yaml"], "autoscaling": ["autoscaling-values.yaml"],
              "refresh": ["refresh-values.yaml"]}


def render(chart: Path = CHART, files=(), overrides: dict | None = None) -> dict[str, list[dict]]:
    """{template: [documents]} as `helm template` would print them."""
    values: dict = dict(TOKEN)
    for f in files:
        values = _merge(values, yaml.safe_load((CI_VALUES / f).read_text()))
    values = _merge(values, overrides or {})
    with helm.Chart.load(str(chart)) as c:
        # the user's values as given: Helm coalesces them with the defaults (a null deletes)
        out = c.render(values, name="sine", namespace="recsys")
    return {k: [d for d in yaml.safe_load_all(v) if d] for k, v in out.items()
            if not k.endswith(".txt")}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def docs(rendered) -> list[dict]:
    return [d for ds in rendered.values() for d in ds]


def kind(rendered, k: str) -> list[dict]:
    return [d for d in docs(rendered) if d["kind"] == k]


def test_helm_lint_is_clean():
    for name, files in VALUE_SETS.items():
        values = dict(TOKEN)
        for f in files:
            values = _merge(values, yaml.safe_load((CI_VALUES / f).read_text()))
        r = helm.lint(str(CHART), values, strict=True, kube_version=K8S_VERSION)
        assert r["errors"] == [], (name, r)
        assert not [m for m in r["messages"] if m["severity"] > 1], (name, r["messages"])


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_manifest_is_valid_kubernetes(name):
    rendered = render(files=VALUE_SETS[name])
    kinds = set()
    for d in docs(rendered):
        kinds.add(d["kind"])
        if d["kind"] in CRDS:
            continue
        kv.validate(d, K8S_VERSION, strict=True)      # raises on an unknown or mistyped field
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    if name == "autoscaling":
        assert {"HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy", "Secret"} <= kinds
    assert ("CronJob" in kinds) == (name == "refresh")      # the refresh job is off by default


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_yamllint_on_rendered_manifests_and_values(name):
    with helm.Chart.load(str(CHART)) as c:
        values = dict(TOKEN)
        for f in VALUE_SETS[name]:
            values = _merge(values, yaml.safe_load((CI_VALUES / f).read_text()))
        out = c.render(c.merge_values(values), name="sine", namespace="recsys")
    # the dashboard's ConfigMap carries a JSON document (checked as JSON, with its PromQL)
    texts = {k: v for k, v in out.items() if not k.endswith((".txt", "dashboard-configmap.yaml"))
             and v.strip()}
    texts["values.yaml"] = (CHART / "values.yaml").read_text()
    texts["Chart.yaml"] = (CHART / "Chart.yaml").read_text()
    for f in CI_VALUES.glob("*.yaml"):
        texts[f.name] = f.read_text()
    problems = [f"{k}:{p.line}: {p.message}" for k, v in texts.items()
                for p in linter.run(v, YAMLLINT) if p.level == "error"]
    assert problems == []


def test_a_broken_chart_fails_the_checks(tmp_path):
    bad = tmp_path / "chart"
    shutil.copytree(CHART, bad)
    dep = bad / "templates" / "deployment.yaml"
    text = dep.read_text()
    # an unknown field: renders fine, refused by the strict schema check
    dep.write_text(text.replace("  revisionHistoryLimit: 5", "  revisionHistoryLimit: 5\n  replicaz: 3"))
    d = kind(render(bad), "Deployment")[0]
    with pytest.raises(kv.ValidationError):
        kv.validate(d, K8S_VERSION, strict=True)
    # a mistyped value
    dep.write_text(text.replace("revisionHistoryLimit: 5", "revisionHistoryLimit: five"))
    with pytest.raises(kv.ValidationError):
        kv.validate(kind(render(bad), "Deployment")[0], K8S_VERSION, strict=True)
    # a template error: rendering itself fails
    dep.write_text(text.replace("{{ include \"sine.fullname\" . }}", "{{ include \"sine.fullname\" . ", 1))
    with pytest.raises(helm.HelmError):
        render(bad)
    # and values that make no sense are refused with a message
    with pytest.raises(helm.HelmError, match="needs bundle.version"):
        render(overrides={"bundle": {"source": "download"}})


def env_names(rendered) -> set[str]:
    names = set()
    for cm in kind(rendered, "ConfigMap"):
        if cm["metadata"]["name"] == "sine-sine-retrieval":      # not the dashboard's
            names |= set(cm["data"])
    for s in kind(rendered, "Secret"):
        names |= set(s.get("stringData") or {})
    return names


# what the chart renders beside the settings: the OTel SDK's own variables, with tracing on
OTEL_SDK = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME",
            "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}


def test_chart_env_names_are_exactly_the_settings_fields():
    from service.settings import env_name

    fields = {env_name(n) for n in Settings.model_fields}
    default = env_names(render())
    assert default <= fields, default - fields
    full = env_names(render(files=["autoscaling-values.yaml"]))
    assert full == fields | OTEL_SDK, (fields - full, full - fields)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    managed = {"host", "port", "bundle", "redis_url", "redis_password", "admin_token",
               "events_token", "read_token", "otel_traces_exporter"}    # the last: tracing.enabled
    assert set(values["settings"]) == set(Settings.model_fields) - managed
    for k, v in values["settings"].items():          # values.yaml documents the real defaults
        f = Settings.model_fields[k]
        assert v == (f.default_factory() if f.default_factory else f.default), k


def test_settings_from_the_configmap_are_accepted_by_the_service(monkeypatch):
    cm = kind(render(files=["autoscaling-values.yaml"]), "ConfigMap")[0]
    for k, v in cm["data"].items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.host == "0.0.0.0" and s.port == 8000 and s.search_params == {"nprobe": 64}
    assert s.otel_traces_exporter == "otlp"
    assert s.redis_url == "redis://sine-sine-retrieval-redis:6379/0"


def test_deployment_probes_rollout_and_security():
    dep = kind(render(), "Deployment")[0]
    spec = dep["spec"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 120
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["allowPrivilegeEscalation"]
    assert pod["securityContext"]["runAsNonRoot"]
    assert {v["name"] for v in pod["volumes"]} == {"bundles", "tmp"}
    assert [m for m in c["volumeMounts"] if m["name"] == "bundles"][0]["readOnly"]
    assert pod["topologySpreadConstraints"]
    assert build_parser().parse_args(c["args"]).command == "serve"
    # the probes' paths are real routes of the app
    from service.app import create_app
    paths = set(create_app(Settings(bundle="/nonexistent")).openapi()["paths"])
    assert {"/livez", "/readyz", "/metrics"} <= paths


def test_gpu_values():
    rendered = render(files=["gpu-values.yaml"])
    pod = kind(rendered, "Deployment")[0]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"] == "ghcr.io/sine-retrieval/sine-retrieval:0.1.0-gpu"
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    init = pod["initContainers"][0]
    args = build_parser().parse_args(init["args"])     # the init container runs a real command
    assert args.command == "fetch-bundle" and args.version == "20261126T195553Z-c11cea28"
    cm = kind(rendered, "ConfigMap")[0]["data"]
    assert cm["SINE_BUNDLE"] == "/bundles/20261126T195553Z-c11cea28"
    assert cm["SINE_PROVIDERS"] == "cuda"


def test_version_bump_rolls_the_pods():
    a = kind(render(overrides={"bundle": {"version": "v1"}}), "Deployment")[0]
    b = kind(render(overrides={"bundle": {"version": "v2"}}), "Deployment")[0]
    ann = lambda d: d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert ann(a) != ann(b)


def test_the_secret_checksum_is_salted_so_tokens_cannot_be_guessed_from_pods():
    """The finding: the pods' checksum/secret was sha256 of the rendered Secret, so whoever can
    read pods could test guessed tokens offline. Now a random salt, kept in the Secret's own
    annotation (reused on upgrades through lookup), goes into the hash."""
    a, b = (render(overrides={"adminToken": "weak"}) for _ in range(2))
    ann = lambda r, key: kind(r, "Deployment")[0]["spec"]["template"]["metadata"]["annotations"][key]
    salt = kind(a, "Secret")[0]["metadata"]["annotations"]["sine-retrieval/checksum-salt"]
    assert len(salt) == 32 and salt.isalnum()
    assert ann(a, "checksum/config") == ann(b, "checksum/config")
    assert ann(a, "checksum/secret") != ann(b, "checksum/secret")      # the same values, salted


def test_service_monitor_points_at_the_metrics_port():
    rendered = render(files=["autoscaling-values.yaml"])
    sm = kind(rendered, "ServiceMonitor")[0]
    svc = kind(rendered, "Service")
    ours = [s for s in svc if s["metadata"]["name"] == "sine-sine-retrieval"][0]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in ours["spec"]["ports"]}
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    labels = ours["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    hpa = kind(rendered, "HorizontalPodAutoscaler")[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}


def test_the_refresh_job_runs_one_cycle_at_a_time_on_the_bundle_volume():
    job = kind(render(files=["refresh-values.yaml"]), "CronJob")[0]
    spec = job["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    tmpl = spec["jobTemplate"]["spec"]
    assert tmpl["activeDeadlineSeconds"] == 3600 and tmpl["backoffLimit"] == 0
    pod = tmpl["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"].endswith(":0.1.0-train")
    from sine_cli.main import build_parser
    a = build_parser().parse_args(c["args"])                # a real `sine refresh` command
    assert a.command == "refresh" and str(a.bundle_root) == "/bundles" and a.dataset == "ml-1m"
    assert (a.new_item_init, a.new_item_oversample) == ("neighbours", 8)
    assert c["resources"]["limits"]["memory"] and c["securityContext"]["runAsNonRoot"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert "readOnly" not in mounts["bundles"]               # it publishes there
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["bundles"]["persistentVolumeClaim"]["claimName"] == "sine-bundles"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SINE_REDIS_URL"] == "redis://redis:6379/0"
    assert c["envFrom"][0]["secretRef"]["name"] == "sine-sine-retrieval"   # the Redis password
    with pytest.raises(helm.HelmError, match="needs bundle.source=pvc"):
        render(files=["refresh-values.yaml"], overrides={"bundle": {"source": "download",
                                                                    "version": "v1"}})
    job = kind(render(files=["refresh-values.yaml"], overrides={"refresh": {
        "newItemInit": "mean", "newItemOversample": 1}}), "CronJob")[0]
    a = build_parser().parse_args(
        job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert (a.new_item_init, a.new_item_oversample) == ("mean", 1)
    with pytest.raises(helm.HelmError, match="refresh.dataset is required"):
        render(overrides={"refresh": {"enabled": True}})
    assert a.keep_version == []                             # pods follow `current`
    job = kind(render(files=["refresh-values.yaml"], overrides={"bundle": {"version": "v7"}}),
               "CronJob")[0]
    a = build_parser().parse_args(
        job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert a.keep_version == ["v7"]                         # retention spares the pinned one


def test_the_schema_and_the_values_table_are_in_step_with_values_yaml():
    from devtools import chart_values

    assert chart_values.main([]) == 0, "run python -m devtools.chart_values --write"
    table = (CHART / "README.md").read_text().split(chart_values.START, 1)[1]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in values:
        assert f"| `{key}" in table, f"the chart README's values table lacks {key}"
    for key in values["settings"]:
        assert f"| `settings.{key}` |" in table


def test_cpu_requests_follow_the_workers_unless_set():
    def container(**overrides):
        dep = kind(render(overrides=overrides), "Deployment")[0]
        return dep["spec"]["template"]["spec"]["containers"][0]
    assert str(container()["resources"]["requests"]["cpu"]) == "1"
    three = render(overrides={"settings": {"workers": 3}})
    c = kind(three, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert str(c["resources"]["requests"]["cpu"]) == "3"
    assert kind(three, "ConfigMap")[0]["data"]["SINE_WORKERS"] == "3"
    fixed = container(resources={"requests": {"cpu": "500m", "memory": "1Gi"}},
                      settings={"workers": 3})
    assert fixed["resources"]["requests"]["cpu"] == "500m"


def test_cluster_mode_reaches_the_service_and_the_refresh_job():
    out = render(files=["refresh-values.yaml"],
                 overrides={"settings": {"redis_cluster": True, "redis_shards": 32}})
    cm = kind(out, "ConfigMap")[0]["data"]
    assert cm["SINE_REDIS_CLUSTER"] == "true" and cm["SINE_REDIS_SHARDS"] == "32"
    job = kind(out, "CronJob")[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in job["containers"][0]["env"]}
    assert env["SINE_REDIS_CLUSTER"] == "true" and env["SINE_REDIS_SHARDS"] == "32"


def test_redis_passwords_stay_out_of_configmaps_and_notes():
    with pytest.raises(helm.HelmError, match="redis.url holds a password"):
        render(overrides={"redis": {"url": "redis://default:hunter2@redis:6379/0"}})
    with pytest.raises(helm.HelmError, match="redis.internal needs a password"):
        render(overrides={"redis": {"internal": {"enabled": True}}})
    values = {"redis": {"url": "rediss://redis.example:6380/0", "password": "hunter2"},
              "eventsToken": "e-tok"}
    rendered = render(overrides=values)
    secret = kind(rendered, "Secret")[0]["stringData"]
    assert secret == {"SINE_REDIS_PASSWORD": "hunter2", "SINE_EVENTS_TOKEN": "e-tok"}
    for cm in kind(rendered, "ConfigMap"):
        assert "hunter2" not in yaml.safe_dump(cm)
    with helm.Chart.load(str(CHART)) as c:
        notes = c.render(c.merge_values(values), name="sine", namespace="recsys")
    notes = next(v for k, v in notes.items() if k.endswith("NOTES.txt"))
    assert "hunter2" not in notes and "password from the Secret" in notes


def test_the_built_in_redis_never_evicts_needs_auth_and_is_fenced():
    rendered = render(overrides={"redis": {"internal": {"enabled": True}, "password": "pw"}})
    redis = next(d for d in kind(rendered, "Deployment") if d["metadata"]["name"].endswith("-redis"))
    c = redis["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--requirepass") + 1] == "$(REDISCLI_AUTH)"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"]}
    assert env == {"REDISCLI_AUTH": "SINE_REDIS_PASSWORD"}     # the probe's redis-cli uses it
    policies = {d["metadata"]["name"]: d for d in kind(rendered, "NetworkPolicy")}
    assert {"sine-sine-retrieval", "sine-sine-retrieval-redis"} <= set(policies)
    fence = policies["sine-sine-retrieval-redis"]["spec"]["ingress"][0]["from"][0]
    assert fence["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "sine"}


def test_network_policy_is_on_by_default():
    assert kind(render(), "NetworkPolicy")


def test_a_narrowed_network_policy_still_lets_the_helm_test_pod_in():
    def admits(policy, labels):
        return any(set(peer.get("podSelector", {}).get("matchLabels", {}).items())
                   <= set(labels.items()) and "namespaceSelector" not in peer
                   for rule in policy["spec"]["ingress"] for peer in rule["from"])

    gateway = {"namespaceSelector": {"matchLabels": {"name": "gateway"}}}
    rendered = render(overrides={"networkPolicy": {"ingressFrom": [gateway]}})
    (test_pod,) = kind(rendered, "Pod")
    labels = test_pod["metadata"]["labels"]
    policy = next(d for d in kind(rendered, "NetworkPolicy")
                  if d["metadata"]["name"] == "sine-sine-retrieval")
    assert admits(policy, labels) and gateway in policy["spec"]["ingress"][0]["from"]
    assert not admits(policy, {**labels, "app.kubernetes.io/instance": "other"})


def test_the_fetch_init_container_gets_its_checks():
    rendered = render(overrides={"bundle": {"source": "download", "version": "v7", "download": {
        "url": "https://store.example/b", "sha256": "a" * 64, "timeoutSeconds": 600}}})
    init = kind(rendered, "Deployment")[0]["spec"]["template"]["spec"]["initContainers"][0]
    args = build_parser().parse_args(init["args"])
    assert (args.sha256, args.timeout_s, args.allow_http) == ("a" * 64, 600.0, False)
    allow = render(overrides={"bundle": {"source": "download", "version": "v7", "download": {
        "url": "http://store.internal/b", "allowHttp": True}}})
    init = kind(allow, "Deployment")[0]["spec"]["template"]["spec"]["initContainers"][0]
    assert build_parser().parse_args(init["args"]).allow_http is True


def test_an_image_digest_pins_the_image():
    d = "sha256:" + "ab" * 32
    pod = kind(render(overrides={"image": {"digest": d}}), "Deployment")[0]
    assert pod["spec"]["template"]["spec"]["containers"][0]["image"] == \
        f"ghcr.io/sine-retrieval/sine-retrieval@{d}"
    pod = kind(render(), "Deployment")[0]
    assert pod["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0")
    pod = kind(render(overrides={"image": {"tag": "0.2.0-rc1"}}), "Deployment")[0]
    assert pod["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.2.0-rc1")


def test_one_version_string_everywhere():
    """pyproject's version is the package's, the API's and the chart's appVersion."""
    import tomllib

    from service.app import create_app
    from service.version import __version__

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert __version__ == version == chart["appVersion"]
    assert create_app(Settings(bundle="/nonexistent")).version == version
    # the image tags default to the appVersion, with -gpu and -train for those images
    rendered = render(files=["refresh-values.yaml"])
    images = {c["image"] for d in kind(rendered, "Deployment") + kind(rendered, "Pod")
              for c in d["spec"].get("template", {}).get("spec", d["spec"])["containers"]}
    cron = kind(rendered, "CronJob")[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert f"ghcr.io/sine-retrieval/sine-retrieval:{version}" in images
    assert cron["containers"][0]["image"].endswith(f":{version}-train")


def test_an_open_events_route_must_be_asked_for():
    with helm.Chart.load(str(CHART)) as c:
        with pytest.raises(helm.HelmError, match="set eventsToken"):
            c.render(c.merge_values({}), name="sine", namespace="recsys")
        for values in ({"eventsOpen": True}, {"existingSecret": "mine"}):
            out = c.render(c.merge_values(values), name="sine", namespace="recsys")
            notes = next(v for k, v in out.items() if k.endswith("NOTES.txt"))
            assert ("eventsOpen=true" in notes) == ("eventsOpen" in values)
    secret = kind(render(), "Secret")[0]["stringData"]
    assert secret["SINE_EVENTS_TOKEN"] == "t0ken"


def test_the_ingress_needs_a_read_token():
    with pytest.raises(helm.HelmError, match="set readToken"):
        render(overrides={"ingress": {"enabled": True}})
    rendered = render(overrides={"ingress": {"enabled": True}, "readToken": "r-tok"})
    assert kind(rendered, "Ingress")
    assert kind(rendered, "Secret")[0]["stringData"]["SINE_READ_TOKEN"] == "r-tok"
