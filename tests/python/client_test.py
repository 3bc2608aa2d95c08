#!/usr/bin/python3
"""End-to-end test of a real ramba-server process through a Python client generated only from
proto/ramba/v1/ramba.proto (Debian's protoc + grpc_python_plugin, python3-grpcio).

    client_test.py SERVER_BINARY MODEL_DIR SOURCE_DIR [CLI_BINARY]

Starts the server on free ports with a temporary data directory, drives a session (create,
append, streaming generate, fork, list, errors), scrapes /metrics over HTTP, restarts the server
and checks the session survived. Prints 'N passed, N failed'."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

server_bin, model_dir, source_dir = sys.argv[1:4]
cli_bin = sys.argv[4] if len(sys.argv) > 4 else None
work = tempfile.mkdtemp(prefix="ramba_py_")
gen = os.path.join(work, "gen")
os.makedirs(gen)
subprocess.run(["protoc", f"-I{source_dir}/proto", f"--python_out={gen}", f"--grpc_out={gen}",
                "--plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin",
                f"{source_dir}/proto/ramba/v1/ramba.proto"], check=True)
sys.path.insert(0, gen)
import grpc  # noqa: E402
from ramba.v1 import ramba_pb2 as pb, ramba_pb2_grpc as rpc  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import check, finish  # noqa: E402


def start():
    p = subprocess.Popen([server_bin, "--model", model_dir, "--data_dir", os.path.join(work, "data"),
                          "--host", "127.0.0.1", "--port", "0", "--metrics_port", "0",
                          "--threads", "1"], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    m = re.search(r"listening on port (\d+), metrics on port (\d+)", line)
    if not m:
        p.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return p, int(m.group(1)), int(m.group(2))


proc, port, metrics_port = start()
try:
    stub = rpc.RambaServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    s = stub.CreateSession(pb.CreateSessionRequest(session_id="py-1",
                                                   initial_input=pb.Input(text="Hello from Python."),
                                                   labels={"client": "python"})).session
    check("create position", s.position == 18, s)
    r = stub.Append(pb.AppendRequest(session_id="py-1", input=pb.Input(text=" More text."),
                                     expected_position=18))
    check("append", r.session.position == 29 and r.appended_tokens == 11, r)
    tokens, final = [], None
    for msg in stub.Generate(pb.GenerateRequest(
            session_id="py-1", sampling=pb.SamplingParams(temperature=0),
            stopping=pb.StoppingCriteria(max_tokens=8, ignore_eos=True))):
        if msg.HasField("tokens"):
            tokens += [t.id for t in msg.tokens.tokens]
        else:
            final = msg.final
    check("generate tokens", len(tokens) == 8, tokens)
    check("generate final", final is not None and final.position == 37
          and final.finish_reason == pb.FINISH_REASON_MAX_TOKENS, final)
    fork = stub.ForkSession(pb.ForkSessionRequest(session_id="py-1", new_session_id="py-2")).session
    check("fork", fork.position == 37 and fork.parent_id == "py-1", fork)
    listed = stub.ListSessions(pb.ListSessionsRequest(page_size=10)).sessions
    check("list", sorted(x.id for x in listed) == ["py-1", "py-2"], listed)
    for req, code in [
        (pb.AppendRequest(session_id="nope", input=pb.Input(text="x")), grpc.StatusCode.NOT_FOUND),
        (pb.AppendRequest(session_id="py-1", input=pb.Input(text="x"), expected_position=1),
         grpc.StatusCode.FAILED_PRECONDITION),
        (pb.AppendRequest(session_id="py-1", input=pb.Input(tokens=pb.TokenIds(ids=[999]))),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.AppendRequest(session_id="bad id", input=pb.Input(text="x")),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        try:
            stub.Append(req)
            check(f"error {code}", False, "no error")
        except grpc.RpcError as e:
            check(f"error {code}", e.code() == code, f"{e.code()} {e.details()}")
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    samples = dict(l.rsplit(" ", 1) for l in body.splitlines() if l and not l.startswith("#"))
    check("metrics generated", float(samples.get('ramba_tokens_total{kind="generated"}', 0)) == 8,
          samples.get('ramba_tokens_total{kind="generated"}'))
    check("metrics prompt", float(samples.get('ramba_tokens_total{kind="prompt"}', 0)) >= 29)

    # Backend memory: the weights and resident sessions, growing with a new session's chunks.
    def backend_bytes():
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
        return float(re.search(rb"^ramba_backend_memory_bytes (\S+)$", body, re.M).group(1))
    before = backend_bytes()
    stub.CreateSession(pb.CreateSessionRequest(session_id="py-mem",
                                               initial_input=pb.Input(text="memory " * 100)))
    after = before
    for _ in range(50):  # the gauge is refreshed every 200 ms
        after = backend_bytes()
        if after > before:
            break
        time.sleep(0.1)
    check("metrics backend memory", before > 0 and after > before, (before, after))
    stub.DeleteSession(pb.DeleteSessionRequest(session_id="py-mem"))

    # Standard gRPC health checking and server reflection, spoken with raw protobuf bytes.
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = channel.unary_unary("/grpc.health.v1.Health/Check",
                                 request_serializer=lambda b: b, response_deserializer=lambda b: b)
    check("health SERVING", health(b"", timeout=10) == b"\x08\x01")
    reflect = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    replies = list(reflect(iter([b"\x3a\x00"]), timeout=10))  # list_services: ""
    check("reflection lists the service", any(b"ramba.v1.RambaService" in r for r in replies), replies)

    if cli_bin:
        # The `ramba` client CLI against the same server.
        def cli(*args, stdin=None):
            return subprocess.run([cli_bin, "--server", f"127.0.0.1:{port}", *args], input=stdin,
                                  capture_output=True, text=True, timeout=60)
        r = cli("create", "--id", "cli-1", "--label", "via=cli", "--text", "abc")
        check("cli create", r.returncode == 0 and '"cli-1"' in r.stdout, r.stderr)
        r = cli("append", "cli-1", "-", stdin="defgh")
        check("cli append stdin", r.returncode == 0 and "8" in r.stdout, (r.stdout, r.stderr))
        r = cli("generate", "cli-1", "--max_tokens", "5", "--temperature", "0", "--ignore_eos")
        check("cli generate", r.returncode == 0 and "13" in r.stderr, (r.stdout, r.stderr))
        r = cli("generate", "cli-1", "--max_tokens", "4", "--temperature", "0", "--ignore_eos",
                "--no_commit", "--top_logprobs", "3", "--repetition_penalty", "1.3")
        alts = [l for l in r.stderr.splitlines() if l.startswith("[token ")]
        check("cli top logprobs", r.returncode == 0 and len(alts) == 4
              and all(len(re.findall(r"' \d+ -?\d+\.\d+;", l)) == 3 for l in alts),
              (r.stdout, r.stderr))
        # A forced token that is also a stop sequence, counted from the second token on.
        q = stub.Tokenize(pb.TokenizeRequest(text="Q")).ids[0]
        r = cli("generate", "cli-1", "--max_tokens", "5", "--temperature", "0", "--no_commit",
                "--logit_bias", f"{q}:100,{q + 1}:-5", "--stop", "Q", "--min_tokens", "2")
        check("cli logit bias and min_tokens", r.returncode == 0 and r.stdout == "Q"
              and "STOP_SEQUENCE" in r.stderr, (r.stdout, r.stderr))
        r = cli("generate", "cli-1", "--logit_bias", "7=1")
        check("cli bad logit bias", r.returncode != 0 and "ID:BIAS" in r.stderr, r.stderr)
        r = cli("fork", "cli-1", "--id", "cli-2")
        check("cli fork", r.returncode == 0 and '"cli-2"' in r.stdout, r.stderr)
        r = cli("list")
        check("cli list", r.returncode == 0 and "cli-1" in r.stdout and "cli-2" in r.stdout, r.stdout)
        r = cli("delete", "cli-2")
        check("cli delete", r.returncode == 0, r.stderr)
        r = cli("get", "cli-2")
        check("cli not found", r.returncode == 1 and "NOT_FOUND" in r.stderr, r.stderr)
        r = cli("append", "cli-1", "--text", "x", "--expected_position", "3")
        check("cli precondition", r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr, r.stderr)
        r = cli("info")
        check("cli info", r.returncode == 0 and "256" in r.stdout, r.stdout)
finally:
    proc.terminate()
    check("drain exit code", proc.wait(timeout=60) == 0)

# Restart: the session is where it was.
proc, port, _ = start()
try:
    stub = rpc.RambaServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    got = stub.GetSession(pb.GetSessionRequest(session_id="py-1")).session
    check("restart position", got.position == 37 and got.labels["client"] == "python", got)
finally:
    proc.terminate()
    proc.wait(timeout=60)
    shutil.rmtree(work, ignore_errors=True)

finish()
