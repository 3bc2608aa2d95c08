#!/usr/bin/python3
"""Checks deploy/ against the server it deploys (no cluster, image build or Envoy needed).

    deploy_test.py SERVER_BINARY MODEL_DIR SOURCE_DIR CLI_BINARY

- The Kubernetes manifests agree with each other (names, selectors, ports, probes, the router's
  replica list, the GPU overlay's patch) and with the image (deploy/docker/Dockerfile).
- A real ramba-server started with the StatefulSet's own arguments (only the model, data
  directory, address and ports replaced) accepts them, and every ramba_* series that the alert
  rules and the Grafana dashboard query is in its /metrics scrape; it drains on SIGTERM within the
  pod's grace period.
- The `ramba` CLI sends the route key the router hashes (a recording gRPC server on loopback).
Prints 'N passed, N failed'; exit status 1 on any failure."""
import concurrent.futures
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
import yaml

server_bin, model_dir, source_dir, cli_bin = sys.argv[1:5]
deploy = os.path.join(source_dir, "deploy")
base = os.path.join(deploy, "kubernetes", "base")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from checks import check, finish  # noqa: E402


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ---- manifests ----
kustomization = load(os.path.join(base, "kustomization.yaml"))[0]
docs = []
for r in kustomization["resources"]:
    docs += load(os.path.join(base, r))
listed = set(kustomization["resources"]) | {
    f for g in kustomization.get("configMapGenerator", []) for f in g["files"]}
on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(base, "*.yaml"))}
check("every manifest is listed in the kustomization", on_disk - {"kustomization.yaml"} == listed,
      on_disk ^ listed)


def one(kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


sts = one("StatefulSet")
pod = sts["spec"]["template"]["spec"]
container = pod["containers"][0]
args = dict(a[2:].split("=", 1) for a in container["args"])
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
headless = one("Service", sts["spec"]["serviceName"])
client_svc = one("Service", "ramba")
router = one("Deployment", "ramba-router")
pdb = one("PodDisruptionBudget")
monitor = one("ServiceMonitor")
labels = sts["spec"]["template"]["metadata"]["labels"]


def selects(selector, pod_labels):
    return all(pod_labels.get(k) == v for k, v in selector.items())


check("statefulset selector", selects(sts["spec"]["selector"]["matchLabels"], labels))
check("headless service", headless["spec"].get("clusterIP") == "None"
      and headless["spec"].get("publishNotReadyAddresses") is True
      and selects(headless["spec"]["selector"], labels))
check("pdb selects the replicas", selects(pdb["spec"]["selector"]["matchLabels"], labels))
check("servicemonitor selects the headless service",
      selects(monitor["spec"]["selector"]["matchLabels"], headless["metadata"]["labels"]))
check("servicemonitor port", monitor["spec"]["endpoints"][0]["port"]
      in [p["name"] for p in headless["spec"]["ports"]])
check("gRPC port is --port", ports.get("grpc") == int(args["port"]), (ports, args["port"]))
check("metrics port is --metrics_port", ports.get("metrics") == int(args["metrics_port"]))
check("service target ports exist",
      all(p["targetPort"] in ports for p in headless["spec"]["ports"]), headless["spec"]["ports"])
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    check(f"{probe} is the gRPC health check on the gRPC port",
          container[probe].get("grpc", {}).get("port") == ports["grpc"], container[probe])
check("grace period covers the drain",
      pod["terminationGracePeriodSeconds"] >= int(args["drain_seconds"]) + 10,
      (pod["terminationGracePeriodSeconds"], args["drain_seconds"]))
mount = container["volumeMounts"][0]
check("sessions on the volume", args["data_dir"].startswith(mount["mountPath"] + "/")
      and mount["name"] == sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"])

# The image the manifests run.
dockerfile = open(os.path.join(deploy, "docker", "Dockerfile")).read()
entry = json.loads(re.search(r"^ENTRYPOINT (\[.*?\])$", dockerfile, re.M | re.S).group(1)
                   .replace("\\\n", ""))
entry_args = dict(a[2:].split("=", 1) for a in entry[1:])
check("image exposes the ports", set(re.search(r"^EXPOSE (.*)$", dockerfile, re.M).group(1).split())
      == {str(ports["grpc"]), str(ports["metrics"])})
check("image entrypoint agrees", entry_args["port"] == args["port"]
      and entry_args["metrics_port"] == args["metrics_port"] and entry_args["model"] == args["model"])
model_name = os.path.basename(args["model"])
check("the image ships the model the manifest names",
      os.path.isdir(os.path.join(source_dir, "models", model_name))
      and f"models/{model_name}" in dockerfile and args["model"].startswith("/opt/ramba/models/"))
uid = int(re.search(r"useradd .*--uid (\d+)", dockerfile).group(1))
check("pod runs as the image's user", pod["securityContext"]["runAsUser"] == uid)
check("image targets", all(re.search(rf"^FROM \S+ AS {t}$", dockerfile, re.M) for t in ("cpu", "cuda")))

# The router: every replica by name, in order, on the gRPC port, hashed by the route key.
envoy = load(os.path.join(base, "envoy.yaml"))[0]
cluster = envoy["static_resources"]["clusters"][0]
endpoints = [e["endpoint"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
name, n = sts["metadata"]["name"], sts["spec"]["replicas"]
check("router lists every replica",
      [e["hostname"] for e in endpoints] == [f"{name}-{i}" for i in range(n)], endpoints)
check("router resolves the headless names",
      [e["address"]["socket_address"]["address"] for e in endpoints]
      == [f"{name}-{i}.{headless['metadata']['name']}" for i in range(n)])
check("router dials the gRPC port",
      all(e["address"]["socket_address"]["port_value"] == ports["grpc"] for e in endpoints))
check("ring hash over names", cluster["lb_policy"] == "RING_HASH" and
      cluster["common_lb_config"]["consistent_hashing_lb_config"]["use_hostname_for_hashing"])
route = (envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
         ["route_config"]["virtual_hosts"][0]["routes"][0]["route"])
check("route key header", route["hash_policy"][0]["header"]["header_name"] == "ramba-route-key")
check("no health checks (sessions never move)", "health_checks" not in cluster
      and "outlier_detection" not in cluster)
envoy_port = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
rc = router["spec"]["template"]["spec"]["containers"][0]
check("router's port", {p["name"]: p["containerPort"] for p in rc["ports"]}.get(
    client_svc["spec"]["ports"][0]["targetPort"]) == envoy_port)
check("router mounts the generated config",
      router["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
      == kustomization["configMapGenerator"][0]["name"])
check("client service selects the router",
      selects(client_svc["spec"]["selector"], router["spec"]["template"]["metadata"]["labels"]))

# Alert rules: one source, two forms.
rules = load(os.path.join(deploy, "prometheus", "rules.yml"))[0]
check("PrometheusRule carries rules.yml", one("PrometheusRule")["spec"] == rules)
prom = load(os.path.join(deploy, "prometheus", "prometheus.yml"))[0]
check("prometheus.yml loads the rules", prom["rule_files"] == ["rules.yml"])

# The GPU overlay's JSON patch, applied here as kustomize would.
overlay = load(os.path.join(deploy, "kubernetes", "gpu", "kustomization.yaml"))[0]
gpu_sts = json.loads(json.dumps(sts))
for op in yaml.safe_load(overlay["patches"][0]["patch"]):
    keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
    node = gpu_sts
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    last = int(keys[-1]) if isinstance(node, list) else keys[-1]
    node[last] = op["value"]
gpu_args = gpu_sts["spec"]["template"]["spec"]["containers"][0]["args"]
check("gpu overlay replaces --device", "--device=cuda" in gpu_args and
      not any(a.startswith("--device=") and a != "--device=cuda" for a in gpu_args), gpu_args)
check("gpu overlay replaces the memory budget",
      [a for a in gpu_args if a.startswith("--max_resident_bytes=")]
      == ["--max_resident_bytes=64000000000"] and int(args["max_resident_bytes"]) > 0, gpu_args)
check("gpu overlay asks for a GPU",
      gpu_sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
      .get("nvidia.com/gpu") == 1)

# ---- the server, started with the manifest's arguments ----
work = tempfile.mkdtemp(prefix="ramba_deploy_")
overrides = [f"--model={model_dir}", f"--data_dir={work}/data", "--host=127.0.0.1", "--port=0",
             "--metrics_port=0", "--threads=1", "--device=cpu"]
proc = subprocess.Popen([server_bin] + container["args"] + overrides, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
line = proc.stdout.readline()
m = re.search(r"listening on port (\d+), metrics on port (\d+)", line)
check("server accepts the manifest's arguments", m is not None,
      f"{line!r} {proc.stderr.read() if m is None else ''}")
if m:
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{m.group(2)}/metrics", timeout=10).read().decode()
    families = set(re.findall(r"^# TYPE (\w+) ", scrape, re.M))
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.load(open(os.path.join(deploy, "grafana", "ramba.json")))
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [dashboard["templating"]["list"][1]["definition"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", s) for e in exprs for s in re.findall(r"ramba_\w+", e)}
    check("every queried series is exported", used and used <= families, used - families)
    check("the dashboard shows every exported family", families <= used, families - used)
    ids = [p["id"] for p in dashboard["panels"]]
    check("dashboard panel ids unique", len(ids) == len(set(ids)))
    # SIGTERM as the kubelet sends it: drained and exited 0 inside the grace period.
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=pod["terminationGracePeriodSeconds"])
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    check("drains on SIGTERM", code == 0, (code, time.time() - t0))
else:
    proc.kill()


# ---- the CLI's route key, seen by a recording server ----
class Recorder(grpc.GenericRpcHandler):
    def __init__(self):
        self.calls = []

    def service(self, details):
        md = dict(details.invocation_metadata)
        self.calls.append((details.method.rsplit("/", 1)[-1], md.get("ramba-route-key")))

        def answer(request, context):
            context.abort(grpc.StatusCode.NOT_FOUND, "recorded")
        return grpc.unary_unary_rpc_method_handler(answer)


recorder = Recorder()
server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2), handlers=[recorder])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
try:
    for cmd in ["get s1", "delete s1", "fork s1 --id f1", "generate s1 --prompt hi",
                "append s1 --text more", "--route_key root get f1", "info"]:
        subprocess.run([cli_bin, "--server", f"127.0.0.1:{port}", "--timeout", "10"]
                       + shlex.split(cmd), capture_output=True)
finally:
    server.stop(0)
session_calls = [c for c in recorder.calls if c[0] != "GetModelInfo"]
check("CLI sends the session's route key", session_calls == [
    ("GetSession", "s1"), ("DeleteSession", "s1"), ("ForkSession", "s1"), ("Generate", "s1"),
    ("Append", "s1"), ("GetSession", "root")], session_calls)
check("CLI sends no key where no session is named",
      ("GetModelInfo", None) in recorder.calls, recorder.calls)

finish()
