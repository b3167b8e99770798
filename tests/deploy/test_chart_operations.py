"""What operators of the chart expect beyond the Deployment: the values schema (a wrong value
fails `helm lint`), the `helm test` hook (run here against a real server), the alert rules and
the dashboard (PromQL that parses, over metric names the service really exports), security
contexts as values, the ServiceAccount, the Ingress and the pod options."""
import json
import os
import re
import subprocess
import sys

import helm_python as helm
import promql_parser
import pytest
import yaml

from service.metrics import Metrics
from service.settings import Settings
from tests.deploy.test_chart import CHART, CI_VALUES, K8S_VERSION, _merge, kind, render

FULL = ["autoscaling-values.yaml"]


def lint(values: dict) -> list[str]:
    values = {"eventsToken": "t0ken", **values}    # the chart refuses an open /events unasked
    r = helm.lint(str(CHART), values, strict=True, kube_version=K8S_VERSION)
    return [str(e) for e in r["errors"]] + [m["error"] for m in r["messages"]
                                            if m["severity"] > 1]


@pytest.mark.parametrize("wrong, says", [
    ({"replicaCount": "two"}, "replicaCount"),
    ({"bundle": {"source": "s3"}}, "source"),
    ({"settings": {"max_n": "lots"}}, "max_n"),
    ({"settings": {"max_n": 0}}, "max_n"),                 # the service's own bound (ge=1)
    ({"settings": {"interest_merge": "best"}}, "interest_merge"),
    ({"settings": {"no_such_setting": 1}}, "no_such_setting"),
    ({"replicas": 3}, "replicas"),                          # an unknown (misspelt) key
    ({"image": {"digest": "latest"}}, "digest"),
    ({"tracing": {"sampler": "sometimes"}}, "sampler"),
    ({"ingress": {"hosts": [{"host": "x"}]}}, "paths"),
    ({"service": {"port": 70000}}, "port"),
    ({"prometheusRule": {"errorRatio": 5}}, "errorRatio"),
    ({"refresh": {"newItemInit": "random"}}, "newItemInit"),
    ({"refresh": {"newItemOversample": 0}}, "newItemOversample"),
])
def test_a_wrong_value_fails_lint_and_says_which(wrong, says):
    problems = lint(wrong)
    assert problems, f"{wrong} passed helm lint"
    assert says in " ".join(problems), problems
    with pytest.raises(helm.HelmError, match=says):          # and helm template refuses it
        render(overrides=wrong)


def test_the_ci_value_sets_pass_the_schema():
    for f in CI_VALUES.glob("*.yaml"):
        assert lint(yaml.safe_load(f.read_text())) == [], f.name


def test_the_schema_follows_the_settings_bounds():
    schema = json.loads((CHART / "values.schema.json").read_text())
    props = schema["properties"]["settings"]["properties"]
    assert props["workers"]["minimum"] == 1 and props["workers"]["maximum"] == 64
    assert set(props["interest_merge"]["enum"]) == {"bundle", "max", "weighted", "quota"}
    assert set(props["default_mode"]["enum"]) == {"bundle", "aggregate", "per_interest"}
    assert schema["properties"]["settings"]["additionalProperties"] is False


def _exported() -> set[str]:
    """Every sample name the service's registry can expose."""
    suffix = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
              "gauge": [""], "summary": ["_count", "_sum"]}
    names = set()
    for fam in Metrics().registry.collect():
        names |= {fam.name + s for s in suffix.get(fam.type, [""])}
    return names


def _metric_names(expr: str) -> set[str]:
    promql_parser.parse(expr)                     # raises on a syntax error
    return set(re.findall(r"\b(sine_[a-z_]+)\b", expr))


def test_the_alert_rules_parse_and_use_exported_metrics():
    assert not kind(render(), "PrometheusRule")              # off by default
    (rule,) = kind(render(files=FULL + ["refresh-values.yaml"]), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = rule["spec"]["groups"][0]["rules"]
    alerts = {r["alert"]: r for r in rules}
    assert {"SineBundleTooOld", "SineRefreshRefused", "SineRefreshStale",
            "SineClickLogLagGrowing", "SineClickLogEntriesLost", "SineErrorRateHigh",
            "SineFallbackRateHigh", "SineLatencyP99High", "SineRedisUnreachable"} <= set(alerts)
    exported = _exported()
    for r in rules:
        used = _metric_names(r["expr"])
        assert used and used <= exported, (r["alert"], used - exported)
        assert 'namespace="recsys"' in r["expr"] and 'service="sine-sine-retrieval"' in r["expr"]
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"]
    assert "> 172800" in alerts["SineBundleTooOld"]["expr"]    # 48 h, from the values
    assert alerts["SineLatencyP99High"]["expr"].endswith("> 0.05")
    # the refresh staleness alert only where the chart runs the refresh job
    (plain,) = kind(render(files=FULL), "PrometheusRule")
    assert "SineRefreshStale" not in {r["alert"] for r in plain["spec"]["groups"][0]["rules"]}


def test_the_dashboard_is_json_over_exported_metrics():
    assert not [c for c in kind(render(), "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    (cm,) = [c for c in kind(render(files=FULL), "ConfigMap")
             if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["sine-retrieval.json"])
    assert dash["uid"] == "sine-retrieval" and dash["panels"]
    exported, used = _exported(), set()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = _metric_names(t["expr"])
            assert names <= exported, (p["title"], names - exported)
            used |= names
    # what the dashboard must show
    for need in ("sine_request_duration_seconds_count", "sine_stage_duration_seconds_bucket",
                 "sine_batch_size_bucket", "sine_fallbacks_total", "sine_bundle_info",
                 "sine_bundle_age_seconds", "sine_refresh_last", "sine_click_log_lag"):
        assert need in used, need


def test_the_helm_test_hook_checks_a_real_server(small_world, redis_server, serve):
    (pod,) = kind(render(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    argv = c["command"] + c["args"]
    assert argv[:3] == ["python", "-m", "service.smoke"]
    assert argv[3] == "http://sine-sine-retrieval:80"          # the Service, by name and port
    assert c["securityContext"]["readOnlyRootFilesystem"]
    s = Settings(bundle=str(small_world["root"]), redis_url=redis_server.url, watch_interval_s=0)
    with serve(s) as client:
        url = f"http://127.0.0.1:{client.port}"
        ok = subprocess.run([sys.executable, *argv[1:3], url], capture_output=True, text=True,
                            timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert "gave 5 items" in ok.stdout
    with serve(Settings(bundle="/nonexistent", watch_interval_s=0), ready=False) as client:
        bad = subprocess.run([sys.executable, *argv[1:3], f"http://127.0.0.1:{client.port}"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "503" in bad.stderr
    gone = subprocess.run([sys.executable, *argv[1:3], f"http://127.0.0.1:{client.port}",
                           "--timeout-s", "2"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "failed" in gone.stderr


def _pods(rendered) -> list[dict]:
    out = [d["spec"]["template"]["spec"] for d in kind(rendered, "Deployment")
           if d["metadata"]["name"] == "sine-sine-retrieval"]
    out += [d["spec"]["jobTemplate"]["spec"]["template"]["spec"] for d in kind(rendered, "CronJob")]
    return out + [d["spec"] for d in kind(rendered, "Pod")]


def test_security_contexts_are_values_with_strict_defaults():
    for pod in _pods(render(files=["refresh-values.yaml"])):
        assert pod["securityContext"]["runAsUser"] == 10001
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    # OpenShift's restricted SCC picks the uid itself: null removes the fixed ones
    openshift = {"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
                 "securityContext": {"runAsUser": None, "runAsGroup": None}}
    assert lint(openshift) == []
    for pod in _pods(render(files=["refresh-values.yaml"], overrides=openshift)):
        assert "runAsUser" not in pod["securityContext"] and "fsGroup" not in pod["securityContext"]
        assert pod["securityContext"]["runAsNonRoot"]
        for c in pod["containers"]:
            assert "runAsUser" not in c["securityContext"]
            assert c["securityContext"]["readOnlyRootFilesystem"]


def test_service_account_ingress_and_pod_options():
    r = render(files=FULL)
    (sa,) = kind(r, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert sa["metadata"]["annotations"] == {"example.com/role": "retrieval"}
    for pod in _pods(r):
        assert pod["serviceAccountName"] == sa["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["priorityClassName"] == "recsys-high"
    none = render(overrides={"serviceAccount": {"create": False}})
    assert not kind(none, "ServiceAccount")
    assert _pods(none)[0]["serviceAccountName"] == "default"
    (ing,) = kind(r, "Ingress")
    assert ing["spec"]["ingressClassName"] == "nginx"
    path = ing["spec"]["rules"][0]["http"]["paths"][0]
    assert path["path"] == "/recommend"
    assert path["backend"]["service"] == {"name": "sine-sine-retrieval", "port": {"name": "http"}}
    assert ing["spec"]["tls"][0]["secretName"] == "sine-tls"
    assert not kind(render(), "Ingress")
    (svc,) = [s for s in kind(r, "Service") if s["metadata"]["name"] == "sine-sine-retrieval"]
    assert svc["metadata"]["annotations"] == {"example.com/owner": "recsys"}
    server = _pods(r)[0]["containers"][0]
    assert {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "deployment.environment=ci"} in server["env"]
    assert {"name": "extra", "mountPath": "/extra", "readOnly": True} in server["volumeMounts"]
    assert {"name": "extra", "emptyDir": {}} in _pods(r)[0]["volumes"]
    assert "runtimeClassName" not in _pods(render())[0]


def test_tracing_values_set_the_sdk_variables():
    cm = kind(render(overrides={"tracing": {"enabled": True, "samplerArg": "0.25"}}),
              "ConfigMap")[0]["data"]
    assert cm["OTEL_TRACES_EXPORTER"] == "otlp"
    assert cm["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert cm["OTEL_SERVICE_NAME"] == "sine-sine-retrieval"
    assert cm["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
    assert "OTEL_TRACES_EXPORTER" not in kind(render(), "ConfigMap")[0]["data"]
    with pytest.raises(helm.HelmError, match="tracing.endpoint is required"):
        render(overrides={"tracing": {"enabled": True, "endpoint": ""}})
    assert _merge({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}


def test_the_helm_test_hook_sends_the_read_token(small_world, redis_server, serve):
    (pod,) = kind(render(overrides={"readToken": "r-tok"}), "Pod")
    c = pod["spec"]["containers"][0]
    (env,) = c["env"]
    assert env["name"] == "SINE_READ_TOKEN"
    assert env["valueFrom"]["secretKeyRef"]["key"] == "SINE_READ_TOKEN"
    argv = c["command"] + c["args"]
    s = Settings(bundle=str(small_world["root"]), redis_url=redis_server.url, watch_interval_s=0,
                 read_token="r-tok")
    with serve(s) as client:
        url = f"http://127.0.0.1:{client.port}"
        run = lambda **env: subprocess.run([sys.executable, *argv[1:3], url], capture_output=True,
                                           text=True, timeout=60, env={**os.environ, **env})
        assert run(SINE_READ_TOKEN="r-tok").returncode == 0
        refused = run(SINE_READ_TOKEN="")
        assert refused.returncode == 1 and "401" in refused.stderr
