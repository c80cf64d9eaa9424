"""Checks of the payment-worker chart that Kubernetes schema validation cannot make.

Usage: check_chart.py HELM CHART RENDER_DIR   (RENDER_DIR holds one render per ci/ values file)
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

HELM, CHART, RENDERS = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
ROOT = Path(__file__).resolve().parent.parent
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


class StrictLoader(yaml.SafeLoader):
    """Refuses a mapping that names a key twice: YAML parsers differ on which one wins."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise yaml.constructor.ConstructorError(None, None, f"keys given twice: {repeated}", node.start_mark)
        return super().construct_mapping(node, deep)


def load(name):
    docs = [d for d in yaml.load_all((RENDERS / f"{name}.yaml").read_text(), Loader=StrictLoader) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def only(docs, kind):
    found = [d for (k, _), d in docs.items() if k == kind]
    return found[0] if len(found) == 1 else None


def helm_template(*args):
    return subprocess.run([HELM, "template", "payment-worker", str(CHART), *args],
                          capture_output=True, text=True)


# The dashboard: valid JSON, unique panel ids, the data source a variable, $namespace and
# $pod variables used by every query, one line of description per panel.
DASHBOARD = json.loads((CHART / "files/dashboard.json").read_text())
variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
check(variables.get("datasource", {}).get("type") == "datasource", "dashboard: a datasource variable")
check({"namespace", "pod"} <= set(variables), "dashboard: $namespace and $pod variables")
panel_ids = [p["id"] for p in DASHBOARD["panels"]]
check(len(panel_ids) == len(set(panel_ids)), f"dashboard: duplicate panel ids in {panel_ids}")
for panel in DASHBOARD["panels"]:
    title = panel.get("title")
    check(panel.get("datasource", {}).get("uid") == "${datasource}", f"dashboard: {title} uses the datasource variable")
    description = panel.get("description", "")
    check(description and "\n" not in description, f"dashboard: {title} has a one-line description")
    for target in panel["targets"]:
        check(target.get("datasource", {}).get("uid") == "${datasource}", f"dashboard: {title} query uses the datasource variable")
        expr = target["expr"]
        check('namespace=~"$namespace"' in expr and 'pod=~"$pod"' in expr, f"dashboard: {title}: {expr} filters by $namespace and $pod")

# The routes the binary serves, read from its router.
routes = set(re.findall(r'\.route\("([^"]+)"', (ROOT / "src/http.rs").read_text()))
# Every setting the binary reads from the environment, wherever its clap attribute lives.
settings = set()
for source in sorted((ROOT / "src").rglob("*.rs")):
    settings |= set(re.findall(r'env = "([A-Z_]+)"', source.read_text()))
if len(settings) < 10:
    sys.exit(f"check_chart.py: found only {sorted(settings)} as settings under src/; "
             "the scan for `env = \"NAME\"` attributes is broken")
SECRET_SETTINGS = {"RABBITMQ_URI", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_KEY"}
# The same secrets as files, and the TLS files: set only when the values ask for them.
FILE_SETTINGS = {f"{s}_FILE" for s in SECRET_SETTINGS} | {
    "RABBITMQ_TLS_CA_FILE", "RABBITMQ_TLS_CERT_FILE", "RABBITMQ_TLS_KEY_FILE"}
RENDERS_WITH_INLINE_SECRETS = {"default-values", "files-and-tls-values"}

for name in ["default-values", "existing-secret-values", "monitoring-values", "single-replica-values",
             "files-and-tls-values", "keda-values", "hpa-values"]:
    docs = load(name)
    deployment = only(docs, "Deployment")
    service = only(docs, "Service")
    settings_maps = [d for (k, n), d in docs.items() if k == "ConfigMap" and not n.endswith("-dashboard")]
    configmap = settings_maps[0] if len(settings_maps) == 1 else None
    check(deployment and service and configmap, f"{name}: Deployment, Service and ConfigMap are rendered")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # Probes hit routes the binary really serves, on the container's port.
    for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        http = container[probe]["httpGet"]
        check(http["path"] == path and http["path"] in routes, f"{name}: {probe} -> {http['path']} is a real route")
        check(http["port"] in ports, f"{name}: {probe} port {http['port']} is a container port")
    check(f"0.0.0.0:{ports['http']}" == configmap["data"]["HTTP_ADDR"], f"{name}: HTTP_ADDR matches the container port")

    # Every worker setting is reachable: from the ConfigMap, or from the Secret.
    env_names = {e["name"] for e in container.get("env", [])}
    reachable = set(configmap["data"]) | env_names
    # Derived from APP_URL unless set; no ceiling unless set; no shared limit when turned off.
    optional = {"STRIPE_SUCCESS_URL", "STRIPE_CANCEL_URL", "STRIPE_MAX_RPS", "STRIPE_ACCOUNT_RPS"}
    stripe = (yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text()) or {}).get("stripe", {})
    shared = stripe.get("rate", {}).get("shareAccountLimit", DEFAULTS["stripe"]["rate"]["shareAccountLimit"])
    limit = str(stripe.get("accountLimit", DEFAULTS["stripe"]["accountLimit"]))
    check(
        configmap["data"].get("STRIPE_ACCOUNT_RPS") == (limit if shared else None),
        f"{name}: STRIPE_ACCOUNT_RPS is stripe.accountLimit exactly when stripe.rate.shareAccountLimit",
    )
    missing = settings - reachable - optional - SECRET_SETTINGS - FILE_SETTINGS
    check(not missing, f"{name}: settings not reachable from values: {sorted(missing)}")
    check(FILE_SETTINGS <= settings, f"{name}: the binary reads {sorted(FILE_SETTINGS - settings)}")

    # Files the settings name are on read-only mounts of the right Secret, holding that key.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for setting in FILE_SETTINGS & set(configmap["data"]):
        path = configmap["data"][setting]
        holding = [m for m in mounts.values() if path.startswith(m["mountPath"] + "/")]
        mount = max(holding, key=lambda m: len(m["mountPath"]), default=None)
        check(mount is not None and mount.get("readOnly") is True, f"{name}: {setting} is on a read-only mount")
        if mount:
            secret_volume = volumes[mount["name"]].get("secret", {})
            check(bool(secret_volume.get("secretName")), f"{name}: {setting} comes from a Secret")
            key = path[len(mount["mountPath"]) + 1:]
            if setting.removesuffix("_FILE") in SECRET_SETTINGS:
                check(key == setting.removesuffix("_FILE"), f"{name}: {setting} is the Secret's {key} key")
                check(setting.removesuffix("_FILE") not in env_names, f"{name}: {setting} and its variable are not both set")
            else:
                check(key in {"ca.crt", "tls.crt", "tls.key"}, f"{name}: {setting} is a cert-manager key ({key})")
    otel = {k: v for k, v in configmap["data"].items() if k.startswith("OTEL_")}
    if name == "monitoring-values":
        check(otel.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "http://otel-collector.observability:4318"
              and otel.get("OTEL_EXPORTER_OTLP_PROTOCOL") == "http/protobuf"
              and otel.get("OTEL_TRACES_SAMPLER_ARG") == "0.1",
              f"{name}: tracing values become the OpenTelemetry variables: {otel}")
    else:
        check(not otel, f"{name}: no OpenTelemetry variables unless tracing.otlpEndpoint is set")
    if name == "files-and-tls-values":
        check(FILE_SETTINGS <= set(configmap["data"]), f"{name}: every file setting is rendered: {sorted(FILE_SETTINGS - set(configmap['data']))}")
        check(not env_names & SECRET_SETTINGS, f"{name}: no secret in the environment")
        uris = only(docs, "Secret")["stringData"]["RABBITMQ_URI"]
        check(len(uris.split(",")) == 3, f"{name}: the Secret holds the three broker URIs")
        check(configmap["data"]["RABBITMQ_CONNECT_TIMEOUT"] == "2s", f"{name}: broker.connectTimeout is rendered")

    # The mounted topology is the one the binary ships.
    profile = {"existing-secret-values": "quorum", "monitoring-values": "extended"}.get(name, "default")
    max_rps = configmap["data"].get("STRIPE_MAX_RPS")
    expected_rps = {"monitoring-values": "12.5", "keda-values": "4"}.get(name)
    check(max_rps == expected_rps,
          f"{name}: STRIPE_MAX_RPS is rendered exactly when stripe.rate.max is set ({max_rps!r})")
    shipped = (ROOT / "topology" / f"{profile}.toml").read_text()
    check(configmap["data"]["topology.toml"].strip() == shipped.strip(),
          f"{name}: the ConfigMap's topology is topology/{profile}.toml")
    mount = container["volumeMounts"][0]["mountPath"]
    check(configmap["data"]["PAYMENT_TOPOLOGY"] == f"{mount}/topology.toml", f"{name}: PAYMENT_TOPOLOGY points at the mount")

    # Locked down.
    pod_security = pod["spec"]["securityContext"]
    security = container["securityContext"]
    check(pod_security.get("runAsNonRoot") is True, f"{name}: runAsNonRoot")
    check(pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp RuntimeDefault")
    check(security.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem")
    check(security.get("allowPrivilegeEscalation") is False, f"{name}: no privilege escalation")
    check(security.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: all capabilities dropped")
    check(pod["spec"].get("automountServiceAccountToken") is False, f"{name}: no service account token")
    check("checksum/config" in pod["metadata"]["annotations"], f"{name}: checksum/config annotation")
    check(container["resources"].get("limits") and container["resources"].get("requests"), f"{name}: requests and limits")

    # Selectors are only the two immutable selector labels, and the Service selects the pods.
    selector = deployment["spec"]["selector"]["matchLabels"]
    check(set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}, f"{name}: selector labels")
    check(service["spec"]["selector"] == selector, f"{name}: the Service selects the pods")
    check(all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items()), f"{name}: pods carry the selector")

    values = yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text()) or {}
    scaling = values.get("autoscaling", {})
    scaled = scaling.get("keda", {}).get("enabled") or scaling.get("hpa", {}).get("enabled")
    scaled_object, trigger_auth = only(docs, "ScaledObject"), only(docs, "TriggerAuthentication")
    hpa = only(docs, "HorizontalPodAutoscaler")
    if scaled:
        check("replicas" not in deployment["spec"], f"{name}: an autoscaled Deployment states no replicas")
    else:
        check(scaled_object is None and hpa is None, f"{name}: no autoscaler by default")
    if scaling.get("keda", {}).get("enabled"):
        check(scaled_object is not None and trigger_auth is not None, f"{name}: ScaledObject and TriggerAuthentication")
        check(scaled_object["apiVersion"] == "keda.sh/v1alpha1" and trigger_auth["apiVersion"] == "keda.sh/v1alpha1",
              f"{name}: KEDA objects are keda.sh/v1alpha1")
        spec = scaled_object["spec"]
        check(spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"], f"{name}: the ScaledObject targets the Deployment")
        check((spec["minReplicaCount"], spec["maxReplicaCount"]) == (scaling["minReplicas"], scaling["maxReplicas"]),
              f"{name}: min and max replicas come from autoscaling.minReplicas and maxReplicas")
        trigger = spec["triggers"][0]
        check(len(spec["triggers"]) == 1 and trigger["type"] == "rabbitmq" and trigger["metadata"]["mode"] == "QueueLength",
              f"{name}: one rabbitmq trigger on the queue's length")
        work_queue = re.search(r'\[work_queue\]\s*name = "([^"]+)"', configmap["data"]["topology.toml"]).group(1)
        check(trigger["metadata"]["queueName"] == work_queue, f"{name}: the trigger watches the topology's work queue ({work_queue})")
        check(trigger["metadata"]["value"] == str(4 * int(configmap["data"]["PREFETCH"])),
              f"{name}: the queue length per replica defaults to 4 x the prefetch")
        check(trigger["authenticationRef"]["name"] == trigger_auth["metadata"]["name"], f"{name}: the trigger uses the TriggerAuthentication")
        refs = trigger_auth["spec"]["secretTargetRef"]
        check(refs == [{"parameter": "host", "name": values["secrets"]["existingSecret"], "key": "RABBITMQ_URI"}],
              f"{name}: the broker address comes from the pods' Secret: {refs}")
        rendered = yaml.safe_dump(scaled_object) + yaml.safe_dump(trigger_auth)
        check("amqp://" not in rendered and "password" not in rendered, f"{name}: no credential in the KEDA objects")
        check(hpa is None, f"{name}: KEDA alone")
    if scaling.get("hpa", {}).get("enabled"):
        check(hpa is not None and hpa["apiVersion"] == "autoscaling/v2", f"{name}: an autoscaling/v2 HPA")
        check(hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]},
              f"{name}: the HPA targets the Deployment")
        check((hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (scaling["minReplicas"], scaling["maxReplicas"]),
              f"{name}: the HPA's bounds")
        check(scaled_object is None, f"{name}: the HPA alone")

    # The reconcile CronJob: in stripe mode, with the worker's settings, secrets and mounts.
    cron = only(docs, "CronJob")
    reconcile = {**DEFAULTS["reconcile"], **values.get("reconcile", {})}
    if values.get("mode", DEFAULTS["mode"]) == "stripe" and reconcile["enabled"]:
        check(cron is not None, f"{name}: the reconcile CronJob is rendered")
    else:
        check(cron is None, f"{name}: no reconcile CronJob without a Stripe key")
    if cron:
        spec = cron["spec"]
        check(spec["schedule"] == reconcile["schedule"], f"{name}: the CronJob runs on reconcile.schedule")
        check(spec["concurrencyPolicy"] == "Forbid", f"{name}: one reconcile run at a time")
        job_pod = spec["jobTemplate"]["spec"]["template"]
        job = job_pod["spec"]["containers"][0]
        check(job["args"][:3] == ["reconcile", "--since", reconcile["since"]], f"{name}: the job runs reconcile: {job['args']}")
        check(job_pod["spec"]["restartPolicy"] == "Never", f"{name}: a failed run is a failed Job, not a restart loop")
        check(job["image"] == container["image"], f"{name}: the job runs the worker's image")
        check(job["envFrom"] == container["envFrom"], f"{name}: the job reads the worker's ConfigMap")
        worker_env = [e for e in container.get("env", []) if e["name"] != "STRIPE_WEBHOOK_KEY"]
        check(job.get("env", []) == worker_env, f"{name}: the job's secrets are the worker's (without the webhook key)")
        check(job["volumeMounts"] == container["volumeMounts"], f"{name}: the job mounts what the worker mounts")
        check(job_pod["spec"]["volumes"] == pod["spec"]["volumes"], f"{name}: the job's volumes are the worker's")
        check(job["securityContext"] == security and job_pod["spec"]["securityContext"] == pod_security,
              f"{name}: the job is locked down as the worker is")
        check(job_pod["spec"].get("automountServiceAccountToken") is False, f"{name}: the job has no service account token")
        labels = job_pod["metadata"]["labels"]
        check(not all(labels.get(k) == v for k, v in selector.items()),
              f"{name}: the Service and the PDB do not select the job's pods")
        check(job["resources"].get("limits") and job["resources"].get("requests"), f"{name}: the job has requests and limits")

    replicas = deployment["spec"].get("replicas", scaling.get("maxReplicas", 0))
    pdb = only(docs, "PodDisruptionBudget")
    if pdb is not None:
        check("maxUnavailable" in pdb["spec"] and "minAvailable" not in pdb["spec"],
              f"{name}: the PDB uses maxUnavailable, valid whatever the replica count")
    if replicas > 1:
        check(pdb is not None and pdb["apiVersion"] == "policy/v1", f"{name}: a policy/v1 PodDisruptionBudget")
        check(pdb["spec"]["selector"]["matchLabels"] == selector, f"{name}: the PDB selects the pods")
    else:
        check(pdb is None, f"{name}: no PodDisruptionBudget with one replica")

    secret = only(docs, "Secret")
    check(name not in RENDERS_WITH_INLINE_SECRETS or secret is not None, f"{name}: inline secrets render a Secret")
    check(name in RENDERS_WITH_INLINE_SECRETS or secret is None, f"{name}: no Secret rendered")
    check("checksum/secret" in pod["metadata"]["annotations"] or secret is None, f"{name}: checksum/secret annotation")
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            check(ref["key"] in SECRET_SETTINGS, f"{name}: secret key {ref['key']} is a fixed key name")

    monitor = only(docs, "ServiceMonitor")
    rule = only(docs, "PrometheusRule")
    if name == "monitoring-values":
        check(monitor is not None and rule is not None, f"{name}: ServiceMonitor and PrometheusRule rendered")
        check(monitor["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
        check(monitor["spec"]["selector"]["matchLabels"] == selector, "ServiceMonitor selects the Service")
        check(all(service["metadata"]["labels"].get(k) == v for k, v in selector.items()), "the Service carries the selector labels")
        endpoint = monitor["spec"]["endpoints"][0]
        check(endpoint["port"] == service["spec"]["ports"][0]["name"], "ServiceMonitor port is the Service's port name")
        check(endpoint["path"] == "/metrics" and "/metrics" in routes, "ServiceMonitor scrapes /metrics")
        check(monitor["metadata"]["labels"].get("release") == "prometheus", "ServiceMonitor carries its extra labels")
        check(rule["apiVersion"] == "monitoring.coreos.com/v1", "PrometheusRule apiVersion")
        shipped_rules = yaml.safe_load((CHART / "files/alerts.yaml").read_text())
        check(rule["spec"] == shipped_rules, "PrometheusRule holds files/alerts.yaml")
        for group in rule["spec"]["groups"]:
            for r in group["rules"]:
                check({"alert", "expr", "for", "labels", "annotations"} <= set(r), f"rule {r.get('alert')} is complete")
                check(r["labels"].get("severity") in {"warning", "critical"}, f"rule {r.get('alert')} has a severity")
        policies = {n: d for (k, n), d in docs.items() if k == "NetworkPolicy"}
        workers = policies.get(deployment["metadata"]["name"])
        jobs = policies.get(f"{deployment['metadata']['name']}-reconcile")
        check(workers is not None and jobs is not None, f"{name}: a NetworkPolicy for the workers and one for the reconcile pods")
        if workers and jobs and cron:
            check(workers["spec"]["podSelector"]["matchLabels"] == selector, "the workers' NetworkPolicy selects the pods")
            check(jobs["spec"]["podSelector"]["matchLabels"].items() <= job_pod["metadata"]["labels"].items(),
                  "the reconcile NetworkPolicy selects the CronJob's pods")
            check(jobs["spec"]["egress"] == workers["spec"]["egress"], "the reconcile pods reach what the workers reach")
            check(jobs["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in jobs["spec"],
                  "nothing may connect to the reconcile pods")
        ingress = only(docs, "Ingress")
        paths = [p["path"] for rule_ in ingress["spec"]["rules"] for p in rule_["http"]["paths"]]
        check(paths == ["/webhook/stripe"] and "/webhook/stripe" in routes, "the Ingress exposes only the webhook")
        dashboards = [d for (k, n), d in docs.items() if k == "ConfigMap" and n.endswith("-dashboard")]
        check(len(dashboards) == 1, f"{name}: the dashboard ConfigMap is rendered")
        if dashboards:
            board = dashboards[0]
            check(board["metadata"]["labels"].get("grafana_dashboard") == "1",
                  "the dashboard ConfigMap carries the Grafana sidecar's label")
            check(json.loads(board["data"]["payment-worker.json"]) == DASHBOARD,
                  "the dashboard ConfigMap holds files/dashboard.json")
    else:
        check(monitor is None and rule is None, f"{name}: monitoring objects are off by default")
        check(not any(n.endswith("-dashboard") for (_, n) in docs), f"{name}: no dashboard by default")

# Renders that must fail, each with a message that says why.
for args, expected in [
    ([], "secrets: mode is stripe"),
    (["--set", "secrets.existingSecret=x", "--set", "secrets.stripeSecretKey=sk"], "not both"),
    (["--set", "mode=mock", "--set", "terminationGracePeriodSeconds=20"], "must be longer than worker.shutdownGrace"),
    (["--set", "mode=bogus"], "mode"),
    (["--set", "mode=mock", "--set", "topology.profile=stream"], "profile"),
    (["--set", "mode=mock", "--set", "worker.prefetch=0"], "prefetch"),
    (["--set", "mode=mock", "--set", "replicaCount=two"], "replicaCount"),
    (["--set", "mode=mock", "--set", "typo=1"], "typo"),
    (["--set", "mode=mock", "--set", "ingress.enabled=true"], "ingress.host"),
    (["--set", "mode=mock", "--set", "broker.tls.clientCertificate=true"], "broker.tls.secretName"),
    (["--set", "mode=mock", "--set", "secrets.rabbitmqUri=amqp://a/%2f\\,http://b/"], "rabbitmqUri"),
    (["--set", "mode=mock", "--set", "broker.connectTimeout=soon"], "connectTimeout"),
    (["--set", "mode=mock", "--set", "autoscaling.keda.enabled=true", "--set", "autoscaling.hpa.enabled=true"],
     "not both"),
    (["--set", "secrets.existingSecret=x", "--set", "autoscaling.keda.enabled=true", "--set", "autoscaling.minReplicas=0"],
     "autoscaling.minReplicas is 0, but the pods serve Stripe's webhook"),
    (["--set", "mode=mock", "--set", "ingress.enabled=true", "--set", "ingress.host=h", "--set", "autoscaling.hpa.enabled=true",
      "--set", "autoscaling.minReplicas=0"], "autoscaling.minReplicas is 0"),
    (["--set", "mode=mock", "--set", "autoscaling.hpa.enabled=true", "--set", "autoscaling.minReplicas=5",
      "--set", "autoscaling.maxReplicas=3"], "autoscaling.minReplicas (5) is above autoscaling.maxReplicas (3)"),
    (["--set", "secrets.existingSecret=x", "--set", "autoscaling.keda.enabled=true", "--set", "autoscaling.maxReplicas=9",
      "--set-json", "stripe.rate.max=12.5"], "autoscaling.maxReplicas (9) × stripe.rate.max (12.5 requests/s) is above stripe.accountLimit (25"),
]:
    result = helm_template(*args)
    check(result.returncode != 0 and expected in result.stderr,
          f"render with {args} should fail mentioning {expected!r}; got {result.returncode}: {result.stderr.strip()[:300]}")

# The CronJob is off with one value.
off = helm_template("--set", "secrets.existingSecret=x", "--set", "reconcile.enabled=false")
check(off.returncode == 0 and "kind: CronJob" not in off.stdout and "kind: Deployment" in off.stdout,
      f"reconcile.enabled=false renders no CronJob: {off.stderr.strip()[:300]}")

# Without the CronJob, the alert on reconcile runs is left out of the PrometheusRule; the rest stays.
unscheduled = helm_template("--set", "secrets.existingSecret=x", "--set", "reconcile.enabled=false",
                            "--set", "prometheusRule.enabled=true")
alerts = [r["alert"] for d in yaml.safe_load_all(unscheduled.stdout) if d and d["kind"] == "PrometheusRule"
          for g in d["spec"]["groups"] for r in g["rules"]]
shipped_alerts = [r["alert"] for g in yaml.safe_load((CHART / "files/alerts.yaml").read_text())["groups"] for r in g["rules"]]
check(unscheduled.returncode == 0 and alerts == [a for a in shipped_alerts if a != "PaymentWorkerReconcileNotSucceeding"],
      f"reconcile.enabled=false leaves out PaymentWorkerReconcileNotSucceeding only: {alerts} {unscheduled.stderr[:300]}")

# Scaling to zero is allowed where nothing serves the webhook (mock mode, no Ingress, no key).
zero = helm_template("--set", "mode=mock", "--set", "autoscaling.keda.enabled=true", "--set", "autoscaling.minReplicas=0")
check(zero.returncode == 0, f"KEDA to zero without a webhook renders: {zero.stderr[:300]}")

# Names stay within 63 characters.
long = subprocess.run([HELM, "template", "a" * 53, str(CHART), "--set", "mode=mock"], capture_output=True, text=True)
check(long.returncode == 0, f"long release name renders: {long.stderr[:200]}")
for doc in yaml.safe_load_all(long.stdout):
    if doc:
        check(len(doc["metadata"]["name"]) <= 63, f"{doc['kind']} name is at most 63 characters")

# The chart's copies of the shipped files are the originals.
for profile in ["default", "quorum"]:
    check((CHART / f"files/topology/{profile}.toml").read_text() == (ROOT / f"topology/{profile}.toml").read_text(),
          f"helm/payment-worker/files/topology/{profile}.toml is a copy of topology/{profile}.toml")

if failures:
    print("chart checks failed:")
    for failure in failures:
        print(f"  - {failure}")
    sys.exit(1)
print("chart checks passed")
