#!/usr/bin/env python3
"""Side-by-side load benchmark: caregate against nginx and HAProxy on one origin.

Started by `bash benches/load/run.sh [--quick] [...]`, which installs the tools and builds caregate in
release mode first. Method (see benches/RESULTS.md): every system under test (SUT) runs one worker
pinned to CPU 1; the load generator (wrk, oha) and the origin (an nginx serving fixed FHIR JSON) share
CPU 0. All SUTs run at once on their own loopback ports; each round measures every (scenario, SUT)
pair in a shuffled order, so drift on this shared machine spreads over all systems. Figures are
reported as per-round ratios: median [min-max].

The mllp scenario (HL7 v2 over MLLP): a native ACK responder (integration-tests' mllp-responder, on
CPU 0) reached directly and through a caregate's MLLP listener (one hl7 route to an mllp pool), with
and without the durable audit trail; the load client is the same binary's --load mode (on CPU 0),
each connection sending an ORU^R01 and waiting for its ACK. Every ACK must be AA.

The caregate-chain-ratelimit-{local,redis} gateways are the full chain plus a `rate_limit` filter
whose limits never refuse, kept in memory or in a redis-server the harness starts on CPU 0 (beside
the load generator and the origin); their ratios to caregate-chain are the filter's cost.

Fails (exit 1) when a SUT answers with errors or unexpected statuses (or an ACK other than AA), when a
gateway relayed fewer HL7 messages than measured, when a rate-limited gateway
did not check every request or used its Redis fallback (store errors, fallback gauge), or when a
ratio cannot be computed. There is no speed assertion.
"""
import argparse
import json
import os
import random
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DATA = HERE.parent / "data"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ISSUER = "https://idp.bench.example"
AUDIENCE = "caregate-bench"
TENANT_HOST = "st-mary.bench.example"

PATIENT_ID = json.loads((DATA / "patient.json").read_text())["id"]
PATIENT_PATH = f"/fhir/Patient/{PATIENT_ID}"
SEARCH_PATH = f"/fhir/Observation?patient={PATIENT_ID}&_include=Observation:patient"

# The mllp scenario's message: a synthetic ORU^R01 (a complete blood count) from the lab's LIS, about
# 1.5 KB, as a lab interface engine sends results. The load client replaces MSH-10 with a unique id
# per message and checks that each ACK's MSA-2 names it.
HL7_ORU_R01 = "\r".join([
    "MSH|^~\\&|LIS|NORTH_LAB|EHR|GENERAL_HOSP|20250301083015+0000||ORU^R01^ORU_R01|BENCH0001|P|2.5.1",
    "PID|1||555-44-4444^^^NORTH_LAB^MR~9876543210^^^NHS^NH||CONN^LIZ^A||19640311|F|||12 HIGH STREET^^SPRINGFIELD^^01103^USA||^PRN^PH^^^413^5550123",
    "PV1|1|O|LAB^^^NORTH_LAB||||1234^SMITH^ANNA^^^DR|||||||||||VN0012345",
    "ORC|RE|ORD448811|LAB778899||CM||||20250301073000+0000|||1234^SMITH^ANNA^^^DR",
    "OBR|1|ORD448811|LAB778899|58410-2^CBC panel - Blood by Automated count^LN|||20250301071500+0000|||||||20250301072000+0000||1234^SMITH^ANNA^^^DR||||||20250301083000+0000||HM|F",
    "OBX|1|NM|6690-2^Leukocytes [#/volume] in Blood by Automated count^LN||6.3|10*3/uL|4.0-11.0|N|||F|||20250301082500+0000",
    "OBX|2|NM|789-8^Erythrocytes [#/volume] in Blood by Automated count^LN||4.52|10*6/uL|3.80-5.20|N|||F|||20250301082500+0000",
    "OBX|3|NM|718-7^Hemoglobin [Mass/volume] in Blood^LN||13.1|g/dL|12.0-16.0|N|||F|||20250301082500+0000",
    "OBX|4|NM|4544-3^Hematocrit [Volume Fraction] of Blood by Automated count^LN||39.8|%|36.0-46.0|N|||F|||20250301082500+0000",
    "OBX|5|NM|787-2^MCV [Entitic volume] by Automated count^LN||88.1|fL|80.0-100.0|N|||F|||20250301082500+0000",
    "OBX|6|NM|785-6^MCH [Entitic mass] by Automated count^LN||29.0|pg|27.0-33.0|N|||F|||20250301082500+0000",
    "OBX|7|NM|786-4^MCHC [Mass/volume] by Automated count^LN||32.9|g/dL|32.0-36.0|N|||F|||20250301082500+0000",
    "OBX|8|NM|777-3^Platelets [#/volume] in Blood by Automated count^LN||251|10*3/uL|150-400|N|||F|||20250301082500+0000",
    "NTE|1|L|Specimen received in good condition.",
]) + "\r"
# An ADT^A01 from the same facility: no hl7 route of the bench gateways takes it (AR, refused).
HL7_ADT_A01 = "\r".join([
    "MSH|^~\\&|ADT|NORTH_LAB|EHR|GENERAL_HOSP|20250301083015+0000||ADT^A01^ADT_A01|BENCHADT1|P|2.5.1",
    "EVN|A01|20250301083000+0000",
    "PID|1||555-44-4444^^^NORTH_LAB^MR||CONN^LIZ^A||19640311|F",
    "PV1|1|I|WARD1^101^1^NORTH_LAB",
]) + "\r"


class HarnessError(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, predicate, timeout=60.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"{what}: the process exited with {proc.returncode}")
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise HarnessError(f"{what}: not ready after {timeout:.0f} s")


def http_get(port, path, headers=None, timeout=5.0):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def redis_command(port, *args, timeout=2.0):
    """One command to a redis-server over RESP; returns the reply's text (a status or a bulk string)."""
    req = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(req)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("redis closed the connection")
            buf += chunk
            if buf[:1] in (b"+", b"-", b":") and buf.endswith(b"\r\n"):
                return buf[1:-2].decode()
            if buf[:1] == b"$" and b"\r\n" in buf:
                size, _, rest = buf[1:].partition(b"\r\n")
                if int(size) < 0:
                    return None
                if len(rest) >= int(size) + 2:
                    return rest[: int(size)].decode()


def redis_script_calls(port):
    """How many times Lua scripts ran (EVALSHA + EVAL calls, from INFO commandstats)."""
    info = redis_command(port, "INFO", "commandstats") or ""
    return sum(int(m.group(1)) for m in re.finditer(r"^cmdstat_eval(?:sha)?:calls=(\d+)", info, re.M))


def prometheus_samples(port):
    """The admin endpoint's /metrics as {(name, labels): value}."""
    status, body, _ = http_get(port, "/metrics")
    if status != 200:
        raise HarnessError(f"/metrics on the admin port {port}: {status}")
    out = {}
    for line in body.decode().splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


# ---------------------------------------------------------------- process accounting


def process_tree(pid):
    """pid and every descendant (nginx's workers, haproxy's children)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pids):
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
    return total


def status_kib(pids, field):
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


class Sut:
    """One running process under test (or the origin) with its ports."""

    def __init__(self, name, argv, port, cpu, cwd=None, ready=None, log_dir=None):
        self.name = name
        self.port = port
        out = open(log_dir / f"{name}.log", "wb") if log_dir else subprocess.DEVNULL
        self.proc = subprocess.Popen(["taskset", "-c", str(cpu)] + argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        self.ready = ready or (lambda: socket.create_connection(("127.0.0.1", port), timeout=0.5).close() is None)
        try:
            wait_for(name, self.ready, proc=self.proc)
        except BaseException:
            self.stop()  # not in the caller's list yet: it would outlive the run
            raise

    def pids(self):
        if self.proc.poll() is not None:
            raise HarnessError(f"{self.name} died (exit {self.proc.returncode})")
        return process_tree(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- configs


def nginx_conf(d, name, connections, http):
    """One nginx worker, no access log, long keep-alive both ways; `http` goes inside `http {}`."""
    return f"""
worker_processes 1;
daemon off;
pid {d}/{name}.pid;
error_log {d}/{name}-error.log warn;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  client_body_temp_path {d}/{name}-tmp;
  keepalive_timeout 300s;
  keepalive_requests 100000000;
{http}
}}
"""


def nginx_origin_conf(d, port):
    return nginx_conf(d, "origin", 4096, f"""
  types {{ }}
  default_type application/fhir+json;
  sendfile on;
  etag off;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {d}/www;
    location = /healthz {{ default_type text/plain; return 200 "ok\\n"; }}
    location /fhir/Patient/ {{ try_files /patient.json =404; }}
    location /fhir/Observation {{ try_files /searchset-70k.json =404; }}
  }}""")


def nginx_sut_conf(d, port, origin):
    # A plain reverse proxy, configured as its guides say for keep-alive to the upstream; response
    # buffering on (nginx's default) with buffers big enough that a 70 KB body never goes to disk.
    return nginx_conf(d, "nginx", 16000, f"""
  proxy_temp_path {d}/nginx-tmp;
  proxy_buffer_size 16k;
  proxy_buffers 16 16k;
  upstream origin {{
    server 127.0.0.1:{origin};
    keepalive 128;
    keepalive_requests 100000000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}""")


def haproxy_conf(port, origin, pub_pem=None):
    jwt = ""
    if pub_pem:
        # jwt_verify checks the signature only; the claim checks a gateway must do are spelled out.
        jwt = f"""
  http-request deny deny_status 401 unless {{ req.hdr(authorization) -m beg "Bearer " }}
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.jwt_alg) var(txn.bearer),jwt_header_query('$.alg')
  http-request set-var(txn.jwt_iss) var(txn.bearer),jwt_payload_query('$.iss')
  http-request set-var(txn.jwt_aud) var(txn.bearer),jwt_payload_query('$.aud')
  http-request set-var(txn.jwt_tenant) var(txn.bearer),jwt_payload_query('$.tenant')
  http-request set-var(txn.jwt_exp) var(txn.bearer),jwt_payload_query('$.exp','int')
  http-request set-var(txn.now) date()
  http-request deny deny_status 401 unless {{ var(txn.jwt_alg) -m str RS256 }}
  http-request deny deny_status 401 unless {{ var(txn.jwt_iss) -m str {ISSUER} }}
  http-request deny deny_status 401 unless {{ var(txn.jwt_aud) -m str {AUDIENCE} }}
  http-request deny deny_status 401 if {{ var(txn.jwt_exp),sub(txn.now) -m int lt 0 }}
  http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.jwt_alg,"{pub_pem}") -m int 1 }}
  http-request deny deny_status 403 unless {{ var(txn.jwt_tenant) -m str st-mary }}
"""
    return f"""
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 30s
  timeout http-keep-alive 300s
frontend fe
  bind 127.0.0.1:{port}
{jwt}
  default_backend be
backend be
  server origin 127.0.0.1:{origin} maxconn 1000
"""


def caregate_conf(d, name, port, admin, origin, kind, routes=10, tenants=1, cache_entries=100000, audit=True, compartment=False, rate_limit=None):
    # Every client here is one address (127.0.0.1) standing for many, and the memory test holds
    # up to 10,000 idle connections: the connection caps (server.connections.max_per_client, 512
    # by default; max_total, by default lowered to what the open-file limit holds, 9,872 under a
    # limit of 20,000) would refuse them with 503s, so both are off.
    head = f"""
server: {{ threads: 1, work_stealing: false, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1, downstream_keepalive_seconds: 300, connections: {{ max_per_client: 0, max_total: 0 }} }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{port}" }} ]
pools:
  - name: origin
    zones: [ {{ name: a, backends: [ {{ address: "127.0.0.1:{origin}" }} ] }} ]
    health_check: {{ path: /healthz, interval_ms: 2000 }}
    timeouts: {{ connect_ms: 1000, read_ms: 30000, write_ms: 30000, idle_ms: 300000 }}
"""
    if kind == "pass":
        body = """
routes:
  - { name: fhir, listener: public, path_prefix: /fhir, pool: origin }
"""
    elif kind == "mask":
        body = """
routes:
  - name: fhir
    listener: public
    path_prefix: /fhir
    fhir: true
    pool: origin
    filters:
      - kind: fhir_mask
        config:
          default:
            "*":
              - { path: text, action: remove }
            Patient:
              - { path: telecom, action: remove }
              - { path: name, action: redact }
              - { path: address, action: { keep_only: [state, postalCode] } }
              - { path: birthDate, action: year }
              - { path: identifier.value, action: { last_chars: 4 } }
"""
    elif kind == "chain":
        lines = [
            f'audit: {{ path: "{d}/{name}-audit.jsonl", hmac_key: "load-harness-audit-key-0123456789abcdef0123" }}' if audit else "",
            "auth:",
            "  issuers:",
            f'    - {{ name: staff, issuer: "{ISSUER}", jwks_file: "{d}/jwks.json", algorithms: [RS256], audiences: [{AUDIENCE}], claims: {{ tenant: tenant, roles: roles{", patient: patient" if compartment else ""} }} }}',
            f"  token_cache: {{ max_entries: {cache_entries}, max_bytes: 67108864 }}",
            "tenants:",
        ]
        # The measured tenant sits in the middle of the list, its /fhir route among the others.
        names = [f"t{i:03d}" for i in range(tenants)]
        names[tenants // 2] = "st-mary"
        for t in names:
            host = TENANT_HOST if t == "st-mary" else f"{t}.bench.example"
            lines.append(f"  - {{ id: {t}, hosts: [{host}] }}")
        lines.append("routes:")
        per_tenant = max(1, routes // tenants)
        for t in names:
            host = TENANT_HOST if t == "st-mary" else f"{t}.bench.example"
            for r in range(per_tenant):
                prefix = "/fhir" if r == 0 else f"/svc{r}"
                lines.append(f"  - name: {t}-r{r}")
                lines.append(f"    listener: public")
                lines.append(f"    hosts: [{host}]")
                lines.append(f"    path_prefix: {prefix}")
                lines.append("    pool: origin")
                if r == 0:
                    lines.append("    fhir: true")
                    if audit:
                        lines.append("    phi: true")
                lines.append("    filters:")
                lines.append("      - { kind: jwt_auth }")
                lines.append("      - { kind: tenant, config: { resolve: [host] } }")
                if r == 0 and rate_limit:
                    lines += rate_limit_filter(d, rate_limit)
                if r == 0:
                    lines.append("      - { kind: smart_scopes }")
                    if compartment:
                        # A patient-context caller: every read is a whole exchange whose
                        # response is checked for the compartment before it is released.
                        lines.append("      - { kind: patient_compartment }")
        body = "\n".join(lines) + "\n"
    else:
        raise ValueError(kind)
    path = d / f"{name}.yaml"
    path.write_text(head + body)
    return path


def caregate_hl7_conf(d, name, port, admin, mllp_port, responder, max_in_flight, audit):
    """A gateway whose MLLP listener relays ORU^R01 messages from NORTH_LAB to the responder (one hl7
    route, one mllp pool); the HTTP listener is required by the config and carries no route."""
    audit_line = f'audit: {{ path: "{d}/{name}-audit.jsonl", hmac_key: "load-harness-audit-key-0123456789abcdef0123" }}' if audit else ""
    path = d / f"{name}.yaml"
    path.write_text(f"""
server: {{ threads: 1, work_stealing: false, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1, connections: {{ max_per_client: 0, max_total: 0 }} }}
admin: {{ listen: "127.0.0.1:{admin}" }}
access_log: {{ enabled: false }}
{audit_line}
listeners: [ {{ name: public, channel: public, listen: "127.0.0.1:{port}" }} ]
pools:
  - name: lab-mllp
    protocol: mllp
    zones: [ {{ name: a, backends: [ {{ address: "127.0.0.1:{responder}" }} ] }} ]
    health_check: {{ interval_ms: 2000 }}
    timeouts: {{ connect_ms: 1000 }}
hl7:
  facilities: [ {{ name: NORTH_LAB }} ]
  listeners:
    - {{ name: hl7-bench, channel: internal, listen: "127.0.0.1:{mllp_port}", max_in_flight: {max_in_flight} }}
  routes:
    - {{ name: lab-results, listener: hl7-bench, message_types: ["ORU^R01"], sending_facilities: [NORTH_LAB], pool: lab-mllp }}
""")
    return path


# The rate_limit filter of the caregate-chain-ratelimit-* gateways: one limit per user (keyed on the
# hashed subject: 1,000 users in rotation) and one per client address, both far above any rate this
# machine reaches, so every request is checked against both and allowed. A refusal would show as a
# non-2xx and fail the run.
RATE_LIMITS = 2


def rate_limit_filter(d, store):
    key_file = d / "ratelimit.key"
    if not key_file.exists():
        key_file.write_text(os.urandom(32).hex() + "\n")
    if store == "local":
        store_yaml = "{ kind: local }"
    else:
        store_yaml = f'{{ kind: redis, url: "redis://127.0.0.1:{store}/0", timeout_ms: 250, fallback: local, local_share: 1.0 }}'
    return [
        "      - kind: rate_limit",
        "        config:",
        "          mode: enforce",
        f'          hash_key: "${{file:{key_file}}}"',
        f"          store: {store_yaml}",
        "          limits:",
        "            - { name: per-user, key: [subject], rate: 1000000, per_seconds: 1 }",
        "            - { name: per-address, key: [client_addr], rate: 1000000, per_seconds: 1 }",
    ]


# ---------------------------------------------------------------- load generators


def run_wrk(port, path, duration, connections, host="localhost", token_file=None):
    argv = ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s"]
    if token_file:
        argv += ["-s", str(HERE / "rotate-tokens.lua"), f"http://127.0.0.1:{port}{path}", "--", str(token_file), host]
    else:
        argv += ["-H", f"Host: {host}", f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise HarnessError(f"wrk failed: {text}")
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m or not rps:
        raise HarnessError(f"cannot read wrk's output: {text}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {
        "requests": int(m.group(1)),
        "rps": float(rps.group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
    }


def run_mllp(responder_bin, port, duration, connections, message_file):
    """The MLLP load client (mllp-responder --load, on CPU 0): `connections` connections, each sending
    the message and waiting for its ACK, for `duration` seconds. Fails on anything but AA."""
    argv = ["taskset", "-c", "0", responder_bin, "--load", f"127.0.0.1:{port}", "--connections", str(connections), "--seconds", str(duration), "--message", str(message_file)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    try:
        doc = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise HarnessError(f"mllp load client failed (exit {out.returncode}): {out.stdout}{out.stderr}")
    not_aa = {k: v for k, v in doc["acks"].items() if k != "AA" and v}
    if out.returncode != 0 or doc["errors"] or not_aa or doc["unreadable_acks"] or doc["mismatched_acks"] or not doc["messages"]:
        raise HarnessError(
            f"mllp load on port {port}: {doc['messages']} messages, ACKs {doc['acks']}, {doc['unreadable_acks']} unreadable, "
            f"{doc['mismatched_acks']} for another control id, errors {doc['errors'][:3]}{out.stderr}"
        )
    return {"requests": doc["acks"]["AA"], "rps": doc["messages_per_second"], "seconds": doc["seconds"], "non2xx": 0, "socket_errors": 0}


def mllp_exchange(port, message, timeout=10.0):
    """Sends one MLLP frame on a new connection; returns (MSA-1, MSA-2) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"\x0b" + message.encode() + b"\x1c\r")
        buf = b""
        while not buf.endswith(b"\x1c\r"):
            chunk = s.recv(65536)
            if not chunk:
                raise HarnessError(f"MLLP port {port}: closed without an answer")
            buf += chunk
    for segment in buf.strip(b"\x0b\x1c\r").split(b"\r"):
        if segment.startswith(b"MSA"):
            fields = segment.decode().split(segment.decode()[3]) + ["", ""]
            return fields[1], fields[2]
    raise HarnessError(f"MLLP port {port}: an answer without MSA: {buf[:200]!r}")


def oha_json_flag():
    help_text = subprocess.run(["oha", "--help"], capture_output=True, text=True).stdout
    return ["--output-format", "json"] if "--output-format" in help_text else ["-j"]


def run_oha(port, path, duration, rate, host, token=None):
    argv = ["taskset", "-c", "0", "oha", "-z", f"{duration}s", "-c", "32", "-q", str(int(rate)), "--latency-correction", "--no-tui"]
    argv += oha_json_flag() + ["-H", f"Host: {host}"]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise HarnessError(f"oha failed: {out.stderr}")
    doc = json.loads(out.stdout)
    pct = doc.get("latencyPercentiles", {})
    codes = doc.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    # Requests still in flight when the run's time is up are "aborted due to deadline": not errors.
    errors = {k: v for k, v in doc.get("errorDistribution", {}).items() if "deadline" not in k}
    bad = sum(v for k, v in codes.items() if not k.startswith("2")) + sum(errors.values())
    return {"error_kinds": errors, "p50_ms": pct["p50"] * 1e3, "p99_ms": pct["p99"] * 1e3, "p999_ms": pct["p99.9"] * 1e3, "ok": ok, "errors": bad}


# ---------------------------------------------------------------- idle connections


def hold_idle_connections(port, count, path, host="localhost"):
    """Opens `count` keep-alive connections, sends one GET on each, reads each full response, and
    returns the open sockets (the caller closes them)."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    socks, pending = [], {}
    for i in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
        pending[s] = b""
        sel.register(s, selectors.EVENT_WRITE)
        if i % 500 == 499:  # let the accept queue drain
            _drive(sel, pending, request, block_until=len(pending) - 400)
    _drive(sel, pending, request, block_until=0)
    return socks


def _drive(sel, pending, request, block_until):
    deadline = time.monotonic() + 60
    while len(pending) > max(block_until, 0):
        if time.monotonic() > deadline:
            raise HarnessError(f"idle connections: {len(pending)} never got a response")
        for key, events in sel.select(timeout=1):
            s = key.fileobj
            if events & selectors.EVENT_WRITE:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise HarnessError(f"idle connections: connect failed ({os.strerror(err)})")
                s.send(request)
                sel.modify(s, selectors.EVENT_READ)
                continue
            data = s.recv(65536)
            if not data:
                raise HarnessError("idle connections: the server closed a connection")
            buf = pending[s] + data
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                if not head.startswith(b"HTTP/1.1 200"):
                    raise HarnessError(f"idle connections: {head.splitlines()[0]!r}")
                cl = re.search(rb"(?i)content-length:\s*(\d+)", head)
                if cl and len(body) >= int(cl.group(1)):
                    sel.unregister(s)
                    del pending[s]
                    continue
            pending[s] = buf


# ---------------------------------------------------------------- statistics


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_spread(s, unit="", digits=2):
    if s is None:
        return "n/a"
    f = f"{{:.{digits}f}}"
    if s["n"] == 1:
        return f.format(s["median"]) + unit
    return f"{f.format(s['median'])}{unit} [{f.format(s['min'])}-{f.format(s['max'])}]"


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs, 2 rounds, fewer idle connections, no open-loop latency")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=int, help="seconds per closed-loop measurement")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (closed loop)")
    ap.add_argument("--idle", type=int, help="idle keep-alive connections for the memory test")
    ap.add_argument("--latency", choices=["auto", "on", "off"], default="auto", help="open-loop latency with oha (auto: when oha is installed and not --quick)")
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    if not target.is_absolute():
        target = ROOT / target
    ap.add_argument("--caregate", default=str(target / "release" / "caregate"), help="the caregate binary (default: the release build in the cargo target dir)")
    ap.add_argument("--mllp-responder", default=str(target / "release" / "mllp-responder"), help="the MLLP responder and load client of the mllp scenario (default: the release build in the cargo target dir)")
    ap.add_argument("--out", help="write the raw results as JSON here")
    ap.add_argument("--baseline", help="another caregate binary (e.g. the release build of the commit before a change): its passthrough, full chain and patient-context chain run beside this one's, in the same rounds, and the report gives this / baseline ratios")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    duration = args.duration or (2 if args.quick else 10)
    warmup = 1 if args.quick else 3
    idle = args.idle or (2000 if args.quick else 10000)
    latency = args.latency == "on" or (args.latency == "auto" and not args.quick and shutil.which("oha"))
    if args.latency == "on" and not shutil.which("oha"):
        raise HarnessError("--latency on needs oha (cargo install oha)")
    for tool in ("wrk", "nginx", "haproxy", "taskset", "node", "redis-server"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise HarnessError(f"{tool} is not installed (run benches/load/run.sh)")
    if not Path(args.caregate).exists():
        raise HarnessError(f"{args.caregate} missing: cargo build --release -p caregate")
    if not Path(args.mllp_responder).exists():
        raise HarnessError(f"{args.mllp_responder} missing: cargo build --release -p caregate-integration-tests --bin mllp-responder")
    if os.cpu_count() < 2:
        raise HarnessError("needs 2 CPUs (SUT on CPU 1, load generator and origin on CPU 0)")

    d = Path(tempfile.mkdtemp(prefix="caregate-load-"))
    d.chmod(0o755)  # nginx workers run as an unprivileged user when started as root
    suts = {}
    results = {"rounds": rounds, "duration_s": duration, "connections": args.connections, "closed": [], "latency": [], "memory": {}}
    try:
        (d / "www").mkdir()
        for tmp in ("origin-tmp", "nginx-tmp"):
            (d / tmp).mkdir()
        shutil.copy(DATA / "patient.json", d / "www" / "patient.json")
        shutil.copy(DATA / "searchset-70k.json", d / "www" / "searchset-70k.json")
        oru_file = d / "oru-r01.hl7"
        oru_file.write_text(HL7_ORU_R01)
        log("minting RS256 tokens (node crypto)...")
        subprocess.run(["taskset", "-c", "0", "node", str(HERE / "mint-tokens.mjs"), str(d), "10000"], check=True, env={**os.environ, "BENCH_PATIENT": PATIENT_ID})
        all_tokens = (d / "tokens-10000.txt").read_text().split()
        tokens = {10000: d / "tokens-10000.txt"}
        for n in (1, 1000):  # the first n of the same tokens, so one priming pass warms every set
            tokens[n] = d / f"tokens-{n}.txt"
            tokens[n].write_text("\n".join(all_tokens[:n]) + "\n")
        one_token = tokens[1].read_text().split()[0]

        nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
        haproxy_bin = shutil.which("haproxy") or "/usr/sbin/haproxy"
        origin_port = free_port()
        (d / "origin.conf").write_text(nginx_origin_conf(d, origin_port))
        log("starting the origin and the systems under test...")
        suts["origin"] = Sut("origin", [nginx_bin, "-c", str(d / "origin.conf"), "-e", str(d / "origin-error.log")], origin_port, 0, log_dir=d)
        p = free_port()
        (d / "nginx.conf").write_text(nginx_sut_conf(d, p, origin_port))
        suts["nginx"] = Sut("nginx", [nginx_bin, "-c", str(d / "nginx.conf"), "-e", str(d / "nginx-error.log")], p, 1, log_dir=d)
        p = free_port()
        (d / "haproxy.cfg").write_text(haproxy_conf(p, origin_port))
        suts["haproxy"] = Sut("haproxy", [haproxy_bin, "-db", "-f", str(d / "haproxy.cfg")], p, 1, log_dir=d)
        p = free_port()
        (d / "haproxy-jwt.cfg").write_text(haproxy_conf(p, origin_port, pub_pem=d / "jwt-pub.pem"))
        suts["haproxy-jwt"] = Sut("haproxy-jwt", [haproxy_bin, "-db", "-f", str(d / "haproxy-jwt.cfg")], p, 1, log_dir=d)
        # The shared store of caregate-chain-ratelimit-redis: a real redis-server on CPU 0 beside the
        # load generator and the origin (the SUT's CPU stays the gateway's alone).
        redis_port = free_port()
        redis_argv = [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        suts["redis"] = Sut("redis", redis_argv, redis_port, 0, cwd=d, ready=lambda: redis_command(redis_port, "PING", timeout=0.5) == "PONG", log_dir=d)
        caregates = {
            "caregate": dict(kind="pass"),
            "caregate-chain": dict(kind="chain"),
            "caregate-chain-nocache": dict(kind="chain", cache_entries=0),
            "caregate-chain-noaudit": dict(kind="chain", audit=False),
            "caregate-chain-scale": dict(kind="chain", routes=1000, tenants=100),
            "caregate-chain-compartment": dict(kind="chain", compartment=True),
            "caregate-chain-ratelimit-local": dict(kind="chain", rate_limit="local"),
            "caregate-chain-ratelimit-redis": dict(kind="chain", rate_limit=redis_port),
            "caregate-mask": dict(kind="mask"),
        }
        rate_limited = {"caregate-chain-ratelimit-local": None, "caregate-chain-ratelimit-redis": redis_port}
        admins = {}
        binaries = {name: args.caregate for name in caregates}
        if args.baseline:
            if not Path(args.baseline).exists():
                raise HarnessError(f"{args.baseline} missing")
            for name in ("caregate", "caregate-chain", "caregate-chain-compartment"):
                caregates[name + "-baseline"] = caregates[name]
                binaries[name + "-baseline"] = args.baseline
        for name, kw in caregates.items():
            p, admin = free_port(), free_port()
            conf = caregate_conf(d, name, p, admin, origin_port, **kw)
            admins[name] = admin
            binary = binaries[name]
            check = subprocess.run([binary, "check", "-c", str(conf)], capture_output=True, text=True)
            if check.returncode != 0:
                raise HarnessError(f"{name}: config refused: {check.stdout}{check.stderr}")
            suts[name] = Sut(
                name,
                [binary, "run", "-c", str(conf)],
                p,
                1,
                ready=lambda admin=admin: http_get(admin, "/readyz", timeout=1)[0] == 200,
                log_dir=d,
            )

        # The mllp scenario: the ACK responder (CPU 0, beside the load client), reached directly and
        # through two gateways (CPU 1): the MLLP relay alone, and with the durable audit trail.
        responder_port = free_port()
        suts["mllp-responder"] = Sut("mllp-responder", [args.mllp_responder, "--listen", f"127.0.0.1:{responder_port}"], responder_port, 0, log_dir=d)
        hl7_gateways = ("caregate-hl7", "caregate-hl7-audit")
        for name in hl7_gateways:
            p, admin, mllp_port = free_port(), free_port(), free_port()
            conf = caregate_hl7_conf(d, name, p, admin, mllp_port, responder_port, max(256, args.connections), audit=name.endswith("-audit"))
            admins[name] = admin
            check = subprocess.run([args.caregate, "check", "-c", str(conf)], capture_output=True, text=True)
            if check.returncode != 0:
                raise HarnessError(f"{name}: config refused: {check.stdout}{check.stderr}")
            suts[name] = Sut(
                name,
                [args.caregate, "run", "-c", str(conf)],
                mllp_port,
                1,
                ready=lambda admin=admin, mllp_port=mllp_port: http_get(admin, "/readyz", timeout=1)[0] == 200
                and socket.create_connection(("127.0.0.1", mllp_port), timeout=0.5).close() is None,
                log_dir=d,
            )

        # (scenario, sut, path, host, token file); the mllp cases have no path, host or token.
        cases = [
            ("patient", "direct", "origin", PATIENT_PATH, "localhost", None),
            ("patient", "nginx", "nginx", PATIENT_PATH, "localhost", None),
            ("patient", "haproxy", "haproxy", PATIENT_PATH, "localhost", None),
            ("patient", "caregate", "caregate", PATIENT_PATH, "localhost", None),
            ("jwt", "haproxy-jwt", "haproxy-jwt", PATIENT_PATH, TENANT_HOST, tokens[1000]),
            ("jwt", "caregate-chain", "caregate-chain", PATIENT_PATH, TENANT_HOST, tokens[1000]),
            ("jwt", "caregate-chain-nocache", "caregate-chain-nocache", PATIENT_PATH, TENANT_HOST, tokens[1000]),
            ("jwt", "caregate-chain-noaudit", "caregate-chain-noaudit", PATIENT_PATH, TENANT_HOST, tokens[1000]),
            ("jwt", "caregate-chain-1token", "caregate-chain", PATIENT_PATH, TENANT_HOST, tokens[1]),
            ("jwt", "caregate-chain-10k-tokens", "caregate-chain", PATIENT_PATH, TENANT_HOST, tokens[10000]),
            ("jwt", "caregate-chain-1000-routes", "caregate-chain-scale", PATIENT_PATH, TENANT_HOST, tokens[1000]),
            ("jwt", "caregate-chain-compartment", "caregate-chain-compartment", PATIENT_PATH, TENANT_HOST, tokens[1000]),
            ("jwt", "caregate-chain-ratelimit-local", "caregate-chain-ratelimit-local", PATIENT_PATH, TENANT_HOST, tokens[1000]),
            ("jwt", "caregate-chain-ratelimit-redis", "caregate-chain-ratelimit-redis", PATIENT_PATH, TENANT_HOST, tokens[1000]),
            ("search70k", "nginx", "nginx", SEARCH_PATH, "localhost", None),
            ("search70k", "caregate", "caregate", SEARCH_PATH, "localhost", None),
            ("search70k", "caregate-mask", "caregate-mask", SEARCH_PATH, "localhost", None),
            ("mllp", "direct", "mllp-responder", None, None, None),
            ("mllp", "caregate-hl7", "caregate-hl7", None, None, None),
            ("mllp", "caregate-hl7-audit", "caregate-hl7-audit", None, None, None),
        ]

        if args.baseline:
            cases += [
                ("patient", "caregate-baseline", "caregate-baseline", PATIENT_PATH, "localhost", None),
                ("jwt", "caregate-chain-baseline", "caregate-chain-baseline", PATIENT_PATH, TENANT_HOST, tokens[1000]),
                ("jwt", "caregate-chain-compartment-baseline", "caregate-chain-compartment-baseline", PATIENT_PATH, TENANT_HOST, tokens[1000]),
            ]

        preflight(suts, one_token)
        preflight_mllp(suts, hl7_gateways)
        # Clients reuse a token many times within its lifetime: every token has been seen once
        # before the measured runs, as a gateway in service would have seen it.
        for name in ("caregate-chain", "caregate-chain-noaudit", "caregate-chain-scale", "caregate-chain-compartment", "caregate-chain-ratelimit-local", "caregate-chain-ratelimit-redis", "caregate-chain-baseline", "caregate-chain-compartment-baseline"):
            if name in suts:
                prime(suts[name].port, all_tokens)
        measured = {name: 0 for name in (*rate_limited, *hl7_gateways)}

        for rnd in range(rounds):
            order = cases[:]
            random.shuffle(order)
            log(f"round {rnd + 1}/{rounds}")
            for scenario, label, sut_name, path, host, tfile in order:
                sut = suts[sut_name]
                if scenario == "mllp":
                    load = lambda seconds: run_mllp(args.mllp_responder, sut.port, seconds, args.connections, oru_file)  # noqa: E731
                else:
                    load = lambda seconds: run_wrk(sut.port, path, seconds, args.connections, host, tfile)  # noqa: E731
                load(warmup)
                pids = sut.pids()
                redis_pids = suts["redis"].pids() if rate_limited.get(sut_name) else []
                before, redis_before = cpu_ticks(pids), cpu_ticks(redis_pids)
                r = load(duration)
                ticks = cpu_ticks(sut.pids()) - before
                r.update(round=rnd, scenario=scenario, sut=label)
                r["cpu_us_per_req"] = ticks / CLK_TCK * 1e6 / r["requests"] if r["requests"] else None
                if redis_pids and r["requests"]:
                    r["redis_cpu_us_per_req"] = (cpu_ticks(redis_pids) - redis_before) / CLK_TCK * 1e6 / r["requests"]
                if r["non2xx"] or r["socket_errors"] or not r["requests"]:
                    raise HarnessError(f"{label} ({scenario}): {r['non2xx']} non-2xx responses, {r['socket_errors']} socket errors, {r['requests']} requests")
                if sut_name in measured:
                    measured[sut_name] += r["requests"]
                if sut_name in rate_limited:
                    check_rate_limits(sut_name, admins[sut_name], measured[sut_name], rate_limited[sut_name])
                unit = "msg" if scenario == "mllp" else "req"
                log(f"  {scenario:10} {label:28} {r['rps']:10.0f} {unit}/s  {r['cpu_us_per_req'] or 0:7.1f} CPU-us/{unit}")
                results["closed"].append(r)

        for name, redis in rate_limited.items():
            results.setdefault("rate_limit_checks", {})[name] = check_rate_limits(name, admins[name], measured[name], redis)
            log(f"  {name}: {results['rate_limit_checks'][name]}")
        for name in hl7_gateways:
            results.setdefault("hl7_checks", {})[name] = check_hl7(name, admins[name], measured[name], audited=name.endswith("-audit"))
            log(f"  {name}: {results['hl7_checks'][name]}")

        if latency:
            measure_latency(results, suts, duration, one_token)
        measure_memory(results, suts, idle)
        for name, sut in suts.items():
            results.setdefault("peak_rss_kib", {})[name] = status_kib(sut.pids(), "VmHWM")
    finally:
        for sut in suts.values():
            sut.stop()
        if os.environ.get("CAREGATE_LOAD_KEEP"):
            log(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)

    ok = report(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


def preflight(suts, token):
    """Each SUT answers what it should before any load: a 200 with the origin's bytes, the chains
    refuse a request without a token, the masking gateway really masks."""
    patient = (DATA / "patient.json").read_bytes()
    for name in ("origin", "nginx", "haproxy", "caregate"):
        status, body, _ = http_get(suts[name].port, PATIENT_PATH)
        if status != 200 or body != patient:
            raise HarnessError(f"preflight {name}: {status}, {len(body)} bytes")
    for name in ("haproxy-jwt", "caregate-chain", "caregate-chain-nocache", "caregate-chain-noaudit", "caregate-chain-scale", "caregate-chain-compartment", "caregate-chain-ratelimit-local", "caregate-chain-ratelimit-redis"):
        port = suts[name].port
        status, body, headers = http_get(port, PATIENT_PATH, {"Host": TENANT_HOST, "Authorization": f"Bearer {token}"})
        if status != 200 or body != patient:
            raise HarnessError(f"preflight {name} with a token: {status} {body[:200]!r}")
        # The rate-limited gateways checked the request and allowed it: the answer carries the limits.
        has_limits = {k.lower() for k in headers} >= {"ratelimit", "ratelimit-policy"}
        if has_limits != ("ratelimit" in name):
            raise HarnessError(f"preflight {name}: RateLimit fields {'missing' if not has_limits else 'unexpected'}: {headers}")
        status, _, _ = http_get(port, PATIENT_PATH, {"Host": TENANT_HOST})
        if status != 401:
            raise HarnessError(f"preflight {name} without a token: {status}, expected 401")
        forged = token[:-8] + ("AAAAAAAA" if not token.endswith("AAAAAAAA") else "BBBBBBBB")
        status, _, _ = http_get(port, PATIENT_PATH, {"Host": TENANT_HOST, "Authorization": f"Bearer {forged}"})
        if status != 401:
            raise HarnessError(f"preflight {name} with a bad signature: {status}, expected 401")
    # The compartment gateway refuses another patient's record (the origin would serve it).
    status, _, _ = http_get(suts["caregate-chain-compartment"].port, "/fhir/Patient/someone-else", {"Host": TENANT_HOST, "Authorization": f"Bearer {token}"})
    if status != 403:
        raise HarnessError(f"preflight caregate-chain-compartment, another patient: {status}, expected 403")
    status, body, _ = http_get(suts["caregate-mask"].port, SEARCH_PATH)
    doc = json.loads(body)
    masked = [e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "Patient"]
    if status != 200 or not masked or "telecom" in masked[0] or len(masked[0].get("birthDate", "")) != 4:
        raise HarnessError(f"preflight caregate-mask: {status}, the Patient was not masked")


def preflight_mllp(suts, gateways):
    """The responder acknowledges the ORU^R01 (AA, MSA-2 = its MSH-10) directly and through each
    gateway; a gateway refuses (AR) a message type no hl7 route takes, so the AA is really relayed
    along the route and not a passthrough."""
    for name in ("mllp-responder", *gateways):
        ack = mllp_exchange(suts[name].port, HL7_ORU_R01)
        if ack != ("AA", "BENCH0001"):
            raise HarnessError(f"preflight {name}, ORU^R01: MSA {ack}, expected ('AA', 'BENCH0001')")
    for name in gateways:
        ack = mllp_exchange(suts[name].port, HL7_ADT_A01)
        if ack != ("AR", "BENCHADT1"):
            raise HarnessError(f"preflight {name}, ADT^A01 (no route): MSA {ack}, expected ('AR', 'BENCHADT1')")


def metric_total(samples, metric, **want):
    """The sum of a metric's samples whose labels have the given values."""
    out = 0.0
    for (n, labels), v in samples.items():
        have = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if n == metric and all(have.get(k) == w for k, w in want.items()):
            out += v
    return out


def check_hl7(name, admin, messages, audited):
    """An MLLP gateway relayed at least every measured message (outcome accepted; only the
    preflight's ADT^A01 was refused, nothing else), and with the audit trail wrote a durable access
    record for each. Returns the counts."""
    samples = prometheus_samples(admin)
    total = metric_total(samples, "caregate_hl7_messages_total")
    accepted = metric_total(samples, "caregate_hl7_messages_total", outcome="accepted")
    refused = metric_total(samples, "caregate_hl7_messages_total", outcome="refused")
    counts = {"measured_messages": messages, "accepted": int(accepted), "refused": int(refused), "other_outcomes": int(total - accepted - refused)}
    if accepted < messages:
        raise HarnessError(f"{name}: caregate_hl7_messages_total{{outcome=\"accepted\"}} is {int(accepted)} for {messages} measured messages")
    if total - accepted - refused:
        raise HarnessError(f"{name}: {int(total - accepted - refused)} HL7 messages with another outcome than accepted or refused")
    if audited:
        ok = metric_total(samples, "caregate_audit_records_total", phase="access", result="ok")
        errors = metric_total(samples, "caregate_audit_records_total", result="error")
        counts.update(audit_access_records=int(ok), audit_errors=int(errors))
        if ok < messages or errors:
            raise HarnessError(f"{name}: {int(ok)} durable access records and {int(errors)} audit errors for {messages} measured messages")
    return counts


def prime(port, tokens):
    """Sends one request per token over one keep-alive connection."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for t in tokens:
            conn.request("GET", PATIENT_PATH, headers={"Host": TENANT_HOST, "Authorization": f"Bearer {t}"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise HarnessError(f"priming the token cache: {r.status}")
    finally:
        conn.close()


def check_rate_limits(name, admin, requests, redis_port):
    """A rate-limited gateway checked at least every measured request against both limits and
    allowed it, without a Redis error or a fallback (from its /metrics, and Redis's own count of
    script runs): the Redis figure is the Redis path. Returns the counts."""
    samples = prometheus_samples(admin)

    def total(metric, **want):
        out = 0.0
        for (n, labels), v in samples.items():
            have = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if n == metric and all(have.get(k) == w for k, w in want.items()):
                out += v
        return out

    decisions = total("caregate_ratelimit_decisions_total")
    allowed = total("caregate_ratelimit_decisions_total", result="allowed")
    errors = total("caregate_ratelimit_store_errors_total")
    fallback = [v for (n, labels), v in samples.items() if n == "caregate_ratelimit_fallback" and 'store="redis"' in labels]
    counts = {"measured_requests": requests, "allowed_decisions": int(allowed), "other_decisions": int(decisions - allowed), "store_errors": int(errors)}
    if errors:
        raise HarnessError(f"{name}: {int(errors)} rate-limit store errors (Redis timed out or failed; the fallback answered)")
    if any(v != 0 for v in fallback):
        raise HarnessError(f"{name}: caregate_ratelimit_fallback{{store=\"redis\"}} is 1: Redis unavailable, the local fallback answered")
    if decisions != allowed:
        raise HarnessError(f"{name}: {int(decisions - allowed)} rate-limit decisions other than allowed")
    if allowed < RATE_LIMITS * requests:
        raise HarnessError(f"{name}: {int(allowed)} allowed rate-limit decisions for {requests} measured requests x {RATE_LIMITS} limits")
    if redis_port is not None:
        if not fallback:
            raise HarnessError(f"{name}: no caregate_ratelimit_fallback{{store=\"redis\"}} gauge: the filter has no Redis store")
        calls = redis_script_calls(redis_port)
        counts["redis_script_calls"] = calls
        if calls < RATE_LIMITS * requests:
            raise HarnessError(f"{name}: Redis ran the limit script {calls} times for {requests} measured requests x {RATE_LIMITS} limits")
    return counts


def measure_latency(results, suts, duration, token):
    nginx_caps = [r["rps"] for r in results["closed"] if r["sut"] == "nginx" and r["scenario"] == "patient"]
    jwt_caps = [r["rps"] for r in results["closed"] if r["sut"] in ("haproxy-jwt", "caregate-chain") and r["scenario"] == "jwt"]
    base = statistics.median(nginx_caps)
    jwt_base = min(statistics.median([r["rps"] for r in results["closed"] if r["sut"] == s and r["scenario"] == "jwt"]) for s in ("haproxy-jwt", "caregate-chain")) if jwt_caps else None
    plan = []
    for frac in (0.25, 0.5):
        for name in ("origin", "nginx", "haproxy", "caregate"):
            plan.append(("patient", name, frac, base * frac, "localhost", None))
        if jwt_base:
            for name in ("haproxy-jwt", "caregate-chain"):
                plan.append(("jwt", name, frac, jwt_base * frac, TENANT_HOST, token))
    log(f"open-loop latency at 25% and 50% of nginx's capacity ({base:.0f} req/s)")
    random.shuffle(plan)
    for scenario, name, frac, rate, host, tok in plan:
        r = run_oha(suts[name].port, PATIENT_PATH, duration, rate, host, tok)
        if r["errors"]:
            raise HarnessError(f"{name} at {rate:.0f} req/s: {r['errors']} errors {r.get('error_kinds')}")
        r.update(scenario=scenario, sut="direct" if name == "origin" else name, fraction=frac, rate=rate)
        log(f"  {scenario:8} {r['sut']:16} {rate:8.0f} req/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  p99.9 {r['p999_ms']:.3f} ms")
        results["latency"].append(r)


def measure_memory(results, suts, count):
    for name in ("nginx", "caregate"):
        sut = suts[name]
        before = status_kib(sut.pids(), "VmRSS")
        socks = hold_idle_connections(sut.port, count, PATIENT_PATH)
        try:
            time.sleep(0.5)  # let the server settle its buffers; this is a reading, not a wait for readiness
            after = status_kib(sut.pids(), "VmRSS")
        finally:
            for s in socks:
                s.close()
        results["memory"][name] = {"idle_connections": count, "rss_before_kib": before, "rss_kib": after}
        log(f"  memory {name:10} {count} idle connections: RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB")


def report(results):
    ok = True
    closed = results["closed"]

    def per_round(scenario, sut, key="rps"):
        return {r["round"]: r[key] for r in closed if r["scenario"] == scenario and r["sut"] == sut}

    def ratio(num, den):
        nonlocal ok
        vals = [num[k] / den[k] for k in num if k in den and den[k]]
        if not vals:
            ok = False
            return None
        return spread(vals)

    def diff(a, b):
        vals = [a[k] - b[k] for k in a if k in b]
        return spread(vals) if vals else None

    print("\n## Throughput and CPU (closed loop, wrk -t1 -c%d, %g s x %d rounds)\n" % (results["connections"], results["duration_s"], results["rounds"]))
    print("| scenario | system | req/s | CPU-us per request |")
    print("|---|---|---|---|")
    seen = []
    for r in closed:
        if (r["scenario"], r["sut"]) not in seen:
            seen.append((r["scenario"], r["sut"]))
    for scenario, sut in seen:
        if scenario != "mllp":
            print(f"| {scenario} | {sut} | {fmt_spread(spread(per_round(scenario, sut).values()), '', 0)} | {fmt_spread(spread(per_round(scenario, sut, 'cpu_us_per_req').values()), '', 1)} |")
    if any(scenario == "mllp" for scenario, _ in seen):
        print("\n## HL7 v2 over MLLP (closed loop, %d connections, one ORU^R01 in flight each, %g s x %d rounds)\n" % (results["connections"], results["duration_s"], results["rounds"]))
        print("CPU per message: the responder's own for direct, the gateway's otherwise.\n")
        print("| system | messages/s | CPU-us per message |")
        print("|---|---|---|")
        for scenario, sut in seen:
            if scenario == "mllp":
                print(f"| {sut} | {fmt_spread(spread(per_round(scenario, sut).values()), '', 0)} | {fmt_spread(spread(per_round(scenario, sut, 'cpu_us_per_req').values()), '', 1)} |")

    rows = [
        ("passthrough throughput, caregate / nginx", ratio(per_round("patient", "caregate"), per_round("patient", "nginx")), ">= 1.0"),
        ("passthrough throughput, caregate / HAProxy", ratio(per_round("patient", "caregate"), per_round("patient", "haproxy")), ""),
        ("passthrough CPU per request, caregate / nginx", ratio(per_round("patient", "caregate", "cpu_us_per_req"), per_round("patient", "nginx", "cpu_us_per_req")), ""),
        ("full chain throughput, caregate / HAProxy jwt_verify", ratio(per_round("jwt", "caregate-chain"), per_round("jwt", "haproxy-jwt")), ">= 1.2"),
        ("full chain CPU per request / caregate passthrough", ratio(per_round("jwt", "caregate-chain", "cpu_us_per_req"), per_round("patient", "caregate", "cpu_us_per_req")), "<= 1.5"),
        ("chain without the audit trail, throughput / HAProxy jwt_verify", ratio(per_round("jwt", "caregate-chain-noaudit"), per_round("jwt", "haproxy-jwt")), ""),
        ("chain without the audit trail, CPU per request / caregate passthrough", ratio(per_round("jwt", "caregate-chain-noaudit", "cpu_us_per_req"), per_round("patient", "caregate", "cpu_us_per_req")), ""),
        ("full chain, no token cache / with cache (throughput)", ratio(per_round("jwt", "caregate-chain-nocache"), per_round("jwt", "caregate-chain")), ""),
        ("1,000 routes + 100 tenants / 10 routes + 1 tenant", ratio(per_round("jwt", "caregate-chain-1000-routes"), per_round("jwt", "caregate-chain")), ">= 0.95"),
        ("10,000 live tokens / one token", ratio(per_round("jwt", "caregate-chain-10k-tokens"), per_round("jwt", "caregate-chain-1token")), ">= 0.9"),
        ("patient-context read (whole exchange + compartment check) / full chain, throughput", ratio(per_round("jwt", "caregate-chain-compartment"), per_round("jwt", "caregate-chain")), ""),
        ("70 KB searchset: masking / caregate passthrough", ratio(per_round("search70k", "caregate-mask"), per_round("search70k", "caregate")), ""),
        ("70 KB searchset: caregate / nginx", ratio(per_round("search70k", "caregate"), per_round("search70k", "nginx")), ""),
    ]
    miss = diff(per_round("jwt", "caregate-chain-nocache", "cpu_us_per_req"), per_round("jwt", "caregate-chain", "cpu_us_per_req"))
    audit_cost = diff(per_round("jwt", "caregate-chain", "cpu_us_per_req"), per_round("jwt", "caregate-chain-noaudit", "cpu_us_per_req"))
    mask_cost = diff(per_round("search70k", "caregate-mask", "cpu_us_per_req"), per_round("search70k", "caregate", "cpu_us_per_req"))
    compartment_cost = diff(per_round("jwt", "caregate-chain-compartment", "cpu_us_per_req"), per_round("jwt", "caregate-chain", "cpu_us_per_req"))
    rows += [
        ("rate limit, local store / full chain without it, throughput", ratio(per_round("jwt", "caregate-chain-ratelimit-local"), per_round("jwt", "caregate-chain")), ""),
        ("rate limit, local store / full chain without it, CPU per request", ratio(per_round("jwt", "caregate-chain-ratelimit-local", "cpu_us_per_req"), per_round("jwt", "caregate-chain", "cpu_us_per_req")), ""),
        ("rate limit, Redis store / full chain without it, throughput", ratio(per_round("jwt", "caregate-chain-ratelimit-redis"), per_round("jwt", "caregate-chain")), ""),
        ("rate limit, Redis store / full chain without it, CPU per request", ratio(per_round("jwt", "caregate-chain-ratelimit-redis", "cpu_us_per_req"), per_round("jwt", "caregate-chain", "cpu_us_per_req")), ""),
    ]
    rows += [
        ("MLLP throughput, through caregate / direct to the responder", ratio(per_round("mllp", "caregate-hl7"), per_round("mllp", "direct")), ""),
        ("MLLP relay CPU per message / HTTP passthrough CPU per request", ratio(per_round("mllp", "caregate-hl7", "cpu_us_per_req"), per_round("patient", "caregate", "cpu_us_per_req")), ""),
        ("MLLP relay CPU per message / the responder's own CPU per message", ratio(per_round("mllp", "caregate-hl7", "cpu_us_per_req"), per_round("mllp", "direct", "cpu_us_per_req")), ""),
        ("MLLP with the durable audit trail / without, throughput", ratio(per_round("mllp", "caregate-hl7-audit"), per_round("mllp", "caregate-hl7")), ""),
    ]
    hl7_audit_cost = diff(per_round("mllp", "caregate-hl7-audit", "cpu_us_per_req"), per_round("mllp", "caregate-hl7", "cpu_us_per_req"))
    rl_local_cost = diff(per_round("jwt", "caregate-chain-ratelimit-local", "cpu_us_per_req"), per_round("jwt", "caregate-chain", "cpu_us_per_req"))
    rl_redis_cost = diff(per_round("jwt", "caregate-chain-ratelimit-redis", "cpu_us_per_req"), per_round("jwt", "caregate-chain", "cpu_us_per_req"))
    redis_cpu = spread(per_round("jwt", "caregate-chain-ratelimit-redis", "redis_cpu_us_per_req").values())
    if any(r["sut"] == "caregate-baseline" for r in closed):
        rows += [
            ("passthrough throughput, this build / baseline", ratio(per_round("patient", "caregate"), per_round("patient", "caregate-baseline")), "~1.0"),
            ("passthrough CPU per request, this build / baseline", ratio(per_round("patient", "caregate", "cpu_us_per_req"), per_round("patient", "caregate-baseline", "cpu_us_per_req")), "~1.0"),
            ("full chain throughput, this build / baseline", ratio(per_round("jwt", "caregate-chain"), per_round("jwt", "caregate-chain-baseline")), "~1.0"),
            ("full chain CPU per request, this build / baseline", ratio(per_round("jwt", "caregate-chain", "cpu_us_per_req"), per_round("jwt", "caregate-chain-baseline", "cpu_us_per_req")), "~1.0"),
            ("patient-context chain throughput, this build / baseline", ratio(per_round("jwt", "caregate-chain-compartment"), per_round("jwt", "caregate-chain-compartment-baseline")), "~1.0"),
            ("patient-context chain CPU per request, this build / baseline", ratio(per_round("jwt", "caregate-chain-compartment", "cpu_us_per_req"), per_round("jwt", "caregate-chain-compartment-baseline", "cpu_us_per_req")), "~1.0"),
        ]
    print("\n## Ratios (per round, median [min-max])\n")
    print("| ratio | value | target |")
    print("|---|---|---|")
    for label, value, target in rows:
        print(f"| {label} | {fmt_spread(value)} | {target} |")
        if value is None:
            log(f"cannot compute: {label}")
    print(f"| token cache miss: extra CPU-us per request | {fmt_spread(miss, '', 1)} | (reported) |")
    print(f"| durable audit trail: extra CPU-us per request | {fmt_spread(audit_cost, '', 1)} | (reported) |")
    print(f"| masking: extra CPU-us per 70 KB response | {fmt_spread(mask_cost, '', 1)} | (reported) |")
    print(f"| patient compartment (whole exchange): extra CPU-us per read | {fmt_spread(compartment_cost, '', 1)} | (reported) |")
    print(f"| MLLP, durable audit trail (access + completion records): extra CPU-us per message | {fmt_spread(hl7_audit_cost, '', 1)} | (reported) |")
    print(f"| rate limit, local store (2 limits): extra CPU-us per request | {fmt_spread(rl_local_cost, '', 1)} | (reported) |")
    print(f"| rate limit, Redis store (2 limits): extra CPU-us per request in the gateway | {fmt_spread(rl_redis_cost, '', 1)} | (reported) |")
    print(f"| rate limit, Redis store: redis-server CPU-us per request (CPU 0, with the load generator) | {fmt_spread(redis_cpu, '', 1)} | (reported) |")

    mem = results["memory"]
    if "caregate" in mem and "nginx" in mem and mem["nginx"]["rss_kib"]:
        n = mem["caregate"]["idle_connections"]
        print(f"\n## Memory with {n} idle keep-alive connections\n")
        print("| system | RSS before | RSS with connections |")
        print("|---|---|---|")
        for name, m in mem.items():
            print(f"| {name} | {m['rss_before_kib'] / 1024:.1f} MiB | {m['rss_kib'] / 1024:.1f} MiB |")
        print(f"\nRSS ratio caregate / nginx: {mem['caregate']['rss_kib'] / mem['nginx']['rss_kib']:.2f} (target <= 2)")
    else:
        ok = False
        log("cannot compute the memory ratio")

    if results["latency"]:
        print("\n## Open-loop latency (oha -q, latency-corrected), the same offered rates for every system\n")
        print("| scenario | system | offered req/s | p50 ms | p99 ms | p99.9 ms | p99 added over direct |")
        print("|---|---|---|---|---|---|---|")
        direct = {r["fraction"]: r for r in results["latency"] if r["sut"] == "direct"}
        for r in sorted(results["latency"], key=lambda r: (r["scenario"], r["fraction"], r["sut"])):
            added = r["p99_ms"] - direct[r["fraction"]]["p99_ms"] if r["scenario"] == "patient" and r["fraction"] in direct else None
            add = f"{added:+.3f} ms" if added is not None else ""
            print(f"| {r['scenario']} | {r['sut']} | {r['rate']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['p999_ms']:.3f} | {add} |")

    rss = results.get("peak_rss_kib", {})
    if rss:
        print("\n## Peak RSS over the whole run (VmHWM)\n")
        print(" | ".join(f"{k} {v / 1024:.1f} MiB" for k, v in rss.items()))
    return ok


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HarnessError as e:
        log(f"load harness: {e}")
        sys.exit(1)
