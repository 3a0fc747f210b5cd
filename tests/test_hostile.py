"""The hostile-candidate suite: train.py files that attack the docker sandbox.

Each candidate is a short standalone script generated here (it runs with the base image's
python: torch and numpy, ``import prepare``). It tries one kind of attack and prints what happened
per attempt; the test reads the record that ``run_trial(spec, "docker")`` returns. Whatever a
candidate does, it must end as ``crash``, ``timeout``, ``oom`` or ``invalid``, or with its true
score; the host, ``prepare.py`` and the data stay untouched; the runner survives; no container
or volume is left.

Nothing of the host is passed to a candidate except what is written into its source: a literal
that the test put there (a port number, the bridge gateway, the first bytes of the host's
validation file), which the candidate then looks for.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

docker = pytest.importorskip("docker")
import docker.errors  # noqa: E402

from runner.paths import PREPARE_PY  # noqa: E402
from runner.sandbox import Limits, TrialSpec  # noqa: E402
from runner.sandbox import images  # noqa: E402
from runner.trial import run_trial  # noqa: E402

RUN = f"hostile{uuid.uuid4().hex[:6]}"   # unique: suites may share an engine
LABEL = f"autoresearch.run={RUN}"
TAG_PREFIX = f"autoresearch/exp:{RUN}-"
BUDGET = 20                    # wall seconds; a probe exits as soon as it is done
EVAL_TOKENS = 4096
UID = 10001

# Small limits for speed; a case overrides what it attacks.
LIMITS = Limits(memory_bytes=2 * 2**30, cpus=1.0, pids=128, out_bytes=256 * 2**20,
                tmp_bytes=256 * 2**20, score_memory_bytes=4 * 2**30,
                score_timeout_s=180)
EXPORT_BUDGET = 90             # candidates that import torch and export a model (1 CPU)

STATUSES = {"ok", "crash", "timeout", "oom", "invalid"}


def _engine_problem() -> str | None:
    try:
        cli = docker.from_env(timeout=10)
        cli.ping()
    except docker.errors.DockerException as exc:
        return f"no Docker engine answers docker.from_env().ping() ({exc}); start dockerd"
    try:
        tag = images.default_base_tag()
    except OSError as exc:
        return f"cannot compute the base image tag: {exc}"
    if not images.base_exists(tag, cli):
        return f"the base image {tag} is missing: build it with `autoresearch images build`"
    return None


_PROBLEM = _engine_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


# ------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli():
    client = docker.from_env(timeout=120)
    yield client
    for image in client.images.list(name="autoresearch/exp"):
        if any(t.startswith(TAG_PREFIX) for t in image.tags):
            for t in image.tags:
                if t.startswith(TAG_PREFIX):
                    try:
                        client.images.remove(t, force=True)
                    except docker.errors.APIError:
                        pass


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def host_untouched(cli, small_data: Path):
    """Every case: prepare.py and the data are byte-identical after it, and nothing of the
    trial (container or volume) is left behind."""
    prepare_before = hashlib.sha256(PREPARE_PY.read_bytes()).hexdigest()
    data_before = tree_hashes(small_data)
    yield
    assert hashlib.sha256(PREPARE_PY.read_bytes()).hexdigest() == prepare_before
    assert tree_hashes(small_data) == data_before
    left = cli.containers.list(all=True, filters={"label": LABEL})
    assert not left, f"containers left: {[c.name for c in left]}"
    vols = cli.volumes.list(filters={"label": LABEL})
    assert not vols, f"volumes left: {[v.name for v in vols]}"


def render(source: str, **values) -> str:
    """Fill `__NAME__` placeholders with Python literals (the test's own knowledge)."""
    for name, value in values.items():
        source = source.replace(f"__{name}__", repr(value))
    assert not re.search(r"__[A-Z][A-Z0-9_]*__", source.replace("__main__", "")), source
    return source


def trial(tmp_path: Path, data: Path, number: int, source: str, budget: int = BUDGET,
          **limits) -> dict:
    train_py = tmp_path / "train.py"
    train_py.write_text(source)
    spec = TrialSpec(train_py=train_py, data_dir=data, budget=budget, run=RUN, number=number,
                     limits=replace(LIMITS, **limits), eval_tokens=EVAL_TOKENS)
    messages: list[str] = []
    record = run_trial(spec, "docker", messages.append)
    assert record["status"] in STATUSES, record
    print(f"\n[hostile {number}] status={record['status']} reason={record['reason']!r} "
          f"val_bpb={record['val_bpb']} phases={record['phases']}")
    return record


def probe_log(record: dict) -> str:
    """The output of a probe candidate, which must have run to its end ("DONE") and, exporting
    no model, been recorded invalid and unscored."""
    log = record["log_tail"]
    assert "DONE" in log, log
    assert record["status"] == "invalid" and record["val_bpb"] is None
    return log


def attempts(log: str, tag: str) -> dict[str, str]:
    """`TAG name: RESULT` lines of a candidate's output."""
    return dict(re.findall(rf"^{tag} (\S+): (.*)$", log, re.M))


# Shared candidate prologue: report each attempt as FAILED <errno> or SUCCEEDED.
PROLOGUE = r'''
import errno, os, sys

def attempt(tag, name, fn):
    try:
        result = fn()
    except OSError as e:
        print(f"{tag} {name}: FAILED {errno.errorcode.get(e.errno, e.errno)} {e.strerror}", flush=True)
        return False
    except Exception as e:
        print(f"{tag} {name}: FAILED {type(e).__name__} {e}", flush=True)
        return False
    print(f"{tag} {name}: SUCCEEDED {result!r}"[:300], flush=True)
    return True
'''


# ------------------------------------------------------------------------------------------
# 1. Writes outside the output
# ------------------------------------------------------------------------------------------

WRITES = PROLOGUE + r'''
import glob

def rewrite_same(path):            # writes the bytes already there: harmless if it worked
    with open(path, "r+b") as f:
        head = f.read(1)
        f.seek(0)
        f.write(head)
        f.flush()
        os.fsync(f.fileno())

def append_nothing(path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"")
    finally:
        os.close(fd)

def create(path):
    with open(path, "x") as f:
        f.write("hostile\n")
    return path

def mkdir(path):
    os.mkdir(path)

size = os.path.getsize("/app/prepare.py")
mode = os.stat("/app/prepare.py").st_mode & 0o7777
must_fail = {
    "prepare_rewrite": lambda: rewrite_same("/app/prepare.py"),
    "prepare_append": lambda: append_nothing("/app/prepare.py"),
    "prepare_truncate_same_size": lambda: os.truncate("/app/prepare.py", size),
    "prepare_chmod": lambda: os.chmod("/app/prepare.py", mode),
    "prepare_utime": lambda: os.utime("/app/prepare.py"),
    "prepare_sibling": lambda: create("/app/prepare_evil.py"),
    "train_py_rewrite": lambda: rewrite_same("/app/train.py"),
    "data_manifest_rewrite": lambda: rewrite_same("/data/manifest.json"),
    "data_tokenizer_append": lambda: append_nothing("/data/tokenizer.json"),
    "data_token_bytes_rewrite": lambda: rewrite_same("/data/token_bytes.npy"),
    "data_shard_rewrite": lambda: rewrite_same(sorted(glob.glob("/data/train/*.npy"))[0]),
    "data_shard_unlink": lambda: os.unlink(sorted(glob.glob("/data/train/*.npy"))[0]),
    "data_new_file": lambda: create("/data/train/hostile.npy"),
    "data_new_val": lambda: mkdir("/data/val"),
    "data_top_new_file": lambda: create("/data/hostile.txt"),
    "root_new_file": lambda: create("/hostile"),
    "etc_passwd": lambda: append_nothing("/etc/passwd"),
    "etc_new_file": lambda: create("/etc/hostile"),
    "usr_bin_new_file": lambda: create("/usr/bin/hostile"),
    "var_tmp_new_file": lambda: create("/var/tmp/hostile"),
    "home_new_file": lambda: create("/home/hostile"),
    "sys_fs_cgroup": lambda: create("/sys/fs/cgroup/hostile"),
}
site = sorted(set(glob.glob("/usr/lib/python3*/site-packages") + glob.glob("/usr/lib/python3*/dist-packages")
                  + glob.glob("/usr/local/lib/python3*/*-packages") + glob.glob("/opt/venv/lib/python3*/site-packages")
                  + [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]))
print("SITE", site, flush=True)
for i, d in enumerate(site):
    must_fail[f"site_pth_{i}"] = (lambda d=d: create(os.path.join(d, "hostile.pth")))
if os.path.isdir("/usr/lib/python3/dist-packages"):
    must_fail["usr_lib_python3_dist"] = lambda: create("/usr/lib/python3/dist-packages/hostile.pth")
print("MUST_FAIL", " ".join(sorted(must_fail)), flush=True)
for name, fn in must_fail.items():
    attempt("ATTEMPT", name, fn)
# Controls: the two places a candidate may write.
attempt("CONTROL", "out", lambda: create("/out/ok.txt"))
attempt("CONTROL", "tmp", lambda: create("/tmp/ok.txt"))
# Informational: other writable mounts docker gives every container.
attempt("INFO", "dev_shm", lambda: create("/dev/shm/hostile"))
# The mount options of what matters: read-only is a property of the mount, not of file modes.
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    print(f"MOUNTOPT {fields[4]} {fields[5]}")
print("DONE", flush=True)
'''


def test_writes_outside_the_output_all_fail(tmp_path, small_data):
    rec = trial(tmp_path, small_data, 1, WRITES)
    log = probe_log(rec)
    names = re.search(r"^MUST_FAIL (.*)$", log, re.M).group(1).split()
    results = attempts(log, "ATTEMPT")
    assert any(n.startswith("site_pth_") for n in names), log
    for name in names:
        assert results.get(name, "").startswith("FAILED"), f"{name}: {results.get(name)}\n{log}"
        assert results[name].split()[1] in ("EROFS", "EACCES", "EPERM", "EEXIST"), results[name]
    # Read-only is a property of the mounts, not luck of file modes: what the file modes would
    # allow an owner (chmod, utime) or the folder would allow (unlink, create) fails with EROFS,
    # and the mounts of the root, prepare.py and the data are all `ro`.
    for name in ("prepare_chmod", "prepare_utime", "prepare_sibling", "data_shard_unlink",
                 "data_new_file", "data_top_new_file", "root_new_file", "etc_new_file"):
        assert results[name].split()[1] == "EROFS", (name, results[name])
    opts = dict(re.findall(r"^MOUNTOPT (\S+) (\S+)$", log, re.M))
    for mount in ("/", "/app/prepare.py", "/data/manifest.json", "/data/tokenizer.json",
                  "/data/token_bytes.npy", "/data/train"):
        assert "ro" in opts[mount].split(","), (mount, opts.get(mount))
    assert not [m for m in opts if m.startswith("/data/val")], opts
    for mount in ("/out", "/tmp"):
        assert "rw" in opts[mount].split(","), (mount, opts.get(mount))
    controls = attempts(log, "CONTROL")
    assert controls["out"].startswith("SUCCEEDED") and controls["tmp"].startswith("SUCCEEDED"), log


# ------------------------------------------------------------------------------------------
# 2. Looking for the validation data
# ------------------------------------------------------------------------------------------

SEARCH = r'''
import os, stat, sys, time
VAL_HEAD = __VAL_HEAD__          # first 64 bytes of the host's val.npy
VAL_CHUNK = __VAL_CHUNK__        # 64 bytes of its token payload
TRAIN_HEAD = __TRAIN_HEAD__      # control: first 64 bytes of a training shard (mounted)
MAX_FILES, MAX_BYTES, MAX_SCAN = 300_000, 768 * 2**20, 8 * 2**20

for p in ("/data/val/val.npy", "/data/val", "/data/../data/val/val.npy"):
    print("DIRECT", p, "exists" if os.path.exists(p) else "absent", flush=True)
for line in open("/proc/self/mountinfo"):
    if "/data" in line or "val" in line:
        print("MOUNT", line.strip())

found, control, seen, files, read_bytes = [], [], set(), 0, 0
t0 = time.time()
complete = True
for top in ("/data", "/app", "/out", "/tmp", "/mnt", "/home", "/root", "/srv", "/opt", "/var", "/run", "/"):
    for root, dirs, names in os.walk(top):
        if root in ("/proc", "/sys", "/dev") or root.startswith(("/proc/", "/sys/", "/dev/")):
            dirs[:] = []
            continue
        st = os.lstat(root)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev")]
        for name in names:
            path = os.path.join(root, name)
            files += 1
            if files > MAX_FILES:
                complete = False
                break
            if name == "val.npy" or (name == "val" and root == "/data"):
                found.append(("name", path))
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    continue
                with open(path, "rb") as f:
                    head = f.read(64)
                    if head == VAL_HEAD:
                        found.append(("head", path))
                    if head == TRAIN_HEAD:
                        control.append(path)
                    if st.st_size <= MAX_SCAN and read_bytes < MAX_BYTES:
                        body = head + f.read()
                        read_bytes += len(body)
                        if VAL_CHUNK in body:
                            found.append(("chunk", path))
            except OSError:
                pass
        if files > MAX_FILES:
            break
print(f"WALK files={files} bytes={read_bytes} complete={complete} seconds={time.time() - t0:.1f}")
print("CONTROL", "FOUND" if control else "NOT FOUND", control[:3])
print("VAL", f"FOUND {found[:5]}" if found else "NOT FOUND", flush=True)
'''


def test_validation_data_is_nowhere_in_the_container(tmp_path, small_data):
    val = (small_data / "val" / "val.npy").read_bytes()
    header_len = int.from_bytes(val[8:10], "little")          # npy format 1.0
    offset = 10 + header_len
    assert len(val) > offset + 1064
    shard = sorted((small_data / "train").glob("*.npy"))[0].read_bytes()
    assert shard[:64] != val[:64]
    src = render(SEARCH, VAL_HEAD=val[:64], VAL_CHUNK=val[offset + 1000:offset + 1064],
                 TRAIN_HEAD=shard[:64])
    rec = trial(tmp_path, small_data, 2, src)
    log = rec["log_tail"]
    assert rec["status"] == "invalid" and rec["val_bpb"] is None
    assert "DIRECT /data/val/val.npy absent" in log and "DIRECT /data/val absent" in log, log
    walk = re.search(r"^WALK files=(\d+) bytes=(\d+) complete=(\w+)", log, re.M)
    assert walk and walk.group(3) == "True", log
    assert "CONTROL FOUND ['/data/train/" in log, log       # the search does find mounted data
    assert re.search(r"^VAL NOT FOUND$", log, re.M), log
    assert not re.search(r"^MOUNT .*/val", log, re.M), log


# ------------------------------------------------------------------------------------------
# 3. Network
# ------------------------------------------------------------------------------------------

NETWORK = PROLOGUE + r'''
import socket
PORT = __PORT__
GATEWAY = __GATEWAY__

def connect(host):
    s = socket.create_connection((host, PORT), timeout=3)
    s.sendall(b"hostile\n")
    s.close()
    return host

def unix(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(3)
    s.connect(path)
    return path

def udp(host):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"hostile", (host, PORT))
    return host

attempt("NET", "loopback", lambda: connect("127.0.0.1"))
attempt("NET", "gateway", lambda: connect(GATEWAY))
attempt("NET", "gateway_udp", lambda: udp(GATEWAY))
attempt("NET", "dns", lambda: socket.getaddrinfo("example.com", 80))
attempt("NET", "docker_sock", lambda: unix("/var/run/docker.sock"))
attempt("NET", "docker_sock_run", lambda: unix("/run/docker.sock"))
ifaces = [line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]]
print("IFACES", " ".join(ifaces))
print("ROUTES", len(open("/proc/net/route").readlines()) - 1)
print("DONE", flush=True)
'''


def test_network_is_unreachable(tmp_path, small_data, cli):
    config = cli.networks.get("bridge").attrs["IPAM"]["Config"][0]
    # Older engines leave Gateway out of the default bridge's IPAM: it is then the subnet's
    # first host (docker0's address). The control connection below proves it is this machine.
    gateway = config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen(16)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted: list = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except (socket.timeout, OSError):
                continue
            accepted.append(peer)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        # The server answers from here: a connection that got through would be recorded.
        with socket.create_connection((gateway, port), timeout=3):
            pass
        deadline = time.time() + 3
        while not accepted and time.time() < deadline:
            time.sleep(0.05)
        assert len(accepted) == 1, "the host's own control connection was not recorded"
        accepted.clear()

        rec = trial(tmp_path, small_data, 3, render(NETWORK, PORT=port, GATEWAY=gateway))
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
    log = probe_log(rec)
    results = attempts(log, "NET")
    for name in ("loopback", "gateway", "gateway_udp", "dns", "docker_sock", "docker_sock_run"):
        assert results.get(name, "").startswith("FAILED"), f"{name}: {results.get(name)}\n{log}"
    assert re.search(r"^IFACES lo$", log, re.M), log           # no interface but loopback
    assert accepted == [], f"the server accepted connections from the candidate: {accepted}"


# ------------------------------------------------------------------------------------------
# 4. Fake scores
# ------------------------------------------------------------------------------------------

FAKE_NO_MODEL = r'''
print('{"status": "ok", "val_bpb": 0.001, "reason": "", "uniform_bpb": 9.0}')
print("---")
print("val_bpb: 0.001")
print("training_seconds: 2.0")
'''

EXPORT = r'''
import os, torch, prepare
V = prepare.load_meta()["vocab_size"]
OUT = os.environ.get("AUTORESEARCH_OUT", "/out")

class Table(torch.nn.Module):
    def __init__(self, shift=0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=g))   # never trained
        self.shift = shift

    def forward(self, idx):
        if self.shift:
            idx = torch.roll(idx, -self.shift, dims=1)
        return self.table[idx]

def export(module, path):
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=prepare.SEQ_LEN)
    ep = torch.export.export(module, (torch.zeros(2, 16, dtype=torch.long),),
                             dynamic_shapes={"idx": {0: batch, 1: seq}})
    torch.export.save(ep, path)
    print("exported", path, os.path.getsize(path), flush=True)
    return path
'''

FAKE_WITH_MODEL = EXPORT + r'''
export(Table(), os.path.join(OUT, "model.pt2"))
print('{"status": "ok", "val_bpb": 0.001, "reason": "", "uniform_bpb": 9.0}')
print("---")
print("val_bpb: 0.001")
'''


def test_fake_score_without_model_is_invalid(tmp_path, small_data):
    rec = trial(tmp_path, small_data, 41, FAKE_NO_MODEL)
    assert rec["status"] == "invalid" and rec["val_bpb"] is None
    assert "model.pt2" in rec["reason"]
    assert rec["score"] == {}
    assert rec["summary"].get("val_bpb") == "0.001"        # its claim is kept, as a claim only


def test_fake_score_with_untrained_model_gets_its_true_score(tmp_path, small_data):
    rec = trial(tmp_path, small_data, 42, FAKE_WITH_MODEL, budget=EXPORT_BUDGET)
    assert rec["status"] == "ok", rec
    assert rec["score"]["status"] == "ok"
    bpb, uniform = rec["val_bpb"], rec["score"]["uniform_bpb"]
    assert bpb == rec["score"]["val_bpb"]
    assert bpb > 0.5 and bpb >= 0.95 * uniform, (bpb, uniform)   # random init: uniform or worse


# ------------------------------------------------------------------------------------------
# 5. A model that peeks at later tokens
# ------------------------------------------------------------------------------------------

PEEK = EXPORT + r'''
export(Table(shift=1), os.path.join(OUT, "model.pt2"))
'''


def test_model_that_peeks_ahead_is_invalid(tmp_path, small_data):
    rec = trial(tmp_path, small_data, 5, PEEK, budget=EXPORT_BUDGET)
    assert rec["status"] == "invalid" and rec["val_bpb"] is None
    assert "causal" in rec["reason"], rec["reason"]


# ------------------------------------------------------------------------------------------
# 6. A model archive with a pickled payload
# ------------------------------------------------------------------------------------------

PICKLED = EXPORT + r'''
import pickle, shutil, zipfile
FAKE = '{"status": "ok", "val_bpb": 0.001, "reason": "", "uniform_bpb": 9.0}'
CMD = (f"echo '{FAKE}'; echo HOSTILE-PAYLOAD-RAN >&2; touch /tmp/hostile-pwned; "
       "touch /model/hostile-pwned 2>/dev/null; true")

class Payload:
    def __reduce__(self):
        return (os.system, (CMD,))

good = export(Table(), "/tmp/good.pt2")
evil, rewritten = "/tmp/evil.pt2", 0
with zipfile.ZipFile(good) as zin, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as zout:
    for info in zin.infolist():
        data = zin.read(info)
        if "/data/sample_inputs/" in info.filename and info.filename.endswith(".pt"):
            data, rewritten = pickle.dumps(Payload()), rewritten + 1
        zout.writestr(info.filename, data)
print("REWROTE", rewritten, flush=True)
# Control: the archive is really hostile (plain torch.export.load runs the payload).
try:
    torch.export.load(evil)
except Exception as e:
    print("control load raised", type(e).__name__)
print("CONTROL payload ran:", os.path.exists("/tmp/hostile-pwned"), flush=True)
os.remove("/tmp/hostile-pwned") if os.path.exists("/tmp/hostile-pwned") else None
shutil.copyfile(evil, os.path.join(OUT, "model.pt2"))
print("---")
print("val_bpb: 0.001")
'''


def test_archive_with_pickled_payload_never_runs_it(tmp_path, small_data):
    """The sample inputs are the candidate's only pickle that torch.export.load would unpickle
    in a plain torch.export archive. The scorer never reads them (it loads sample inputs it made
    itself), so the payload never runs and the program gets its true score."""
    rec = trial(tmp_path, small_data, 6, PICKLED, budget=EXPORT_BUDGET)
    log = rec["log_tail"]
    assert re.search(r"^REWROTE [1-9]", log, re.M), log
    assert "CONTROL payload ran: True" in log, log              # the threat is real
    assert '{"status": "ok", "val_bpb": 0.001' in log          # its fake line was printed
    assert rec["status"] == "ok", rec
    assert rec["val_bpb"] >= 0.95 * rec["score"]["uniform_bpb"]   # untrained: its true score
    assert "HOSTILE-PAYLOAD-RAN" not in json.dumps(rec["score"]) + rec["reason"]


# ------------------------------------------------------------------------------------------
# 6b. Crafted archives and models that try to fool the scorer (tests/attack_models.py)
# ------------------------------------------------------------------------------------------

ATTACK_MODELS = (Path(__file__).parent / "attack_models.py").read_text()

ATTACK = ATTACK_MODELS + r'''
import os, prepare
V = prepare.load_meta()["vocab_size"]
OUT = os.environ.get("AUTORESEARCH_OUT", "/out")
KIND, ROWS = __KIND__, __ROWS__
if KIND == "uniform":
    class Uniform(torch.nn.Module):
        def forward(self, idx):
            return torch.zeros(idx.shape[0], idx.shape[1], V)
    model = Uniform()
else:
    model = build(KIND, V, rows=ROWS)
export(model, os.path.join(OUT, "model.pt2"))
print("EXPORTED", KIND, flush=True)
'''

# A file that holds two archives: a clean one that any reader finds, and before it an evil one
# whose weights are "pickled" (a payload that prints a forged result and a marker), or the
# clean one alone with bytes before it, or a sparse file past the size limit.
CRAFTED_FILE = EXPORT + r'''
import json, pickle, zipfile
KIND = __KIND__
FAKE = '{"status": "ok", "val_bpb": 0.001, "reason": "", "uniform_bpb": 9.0}'
CMD = f"echo '{FAKE}'; echo HOSTILE-PAYLOAD-RAN >&2; true"

class Payload:
    def __reduce__(self):
        return (os.system, (CMD,))

clean = open(export(Table(), "/tmp/clean.pt2"), "rb").read()
path = os.path.join(OUT, "model.pt2")
if KIND == "polyglot":
    with zipfile.ZipFile("/tmp/clean.pt2") as zin, zipfile.ZipFile("/tmp/evil.pt2", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("_config.json"):
                cfg = json.loads(data)
                for meta in cfg["config"].values():
                    meta["use_pickle"] = True
                data = json.dumps(cfg).encode()
            elif "/data/weights/weight_" in info.filename:
                data = pickle.dumps(Payload())
            zout.writestr(info.filename, data)
    open(path, "wb").write(open("/tmp/evil.pt2", "rb").read() + clean)
elif KIND == "leading-bytes":
    open(path, "wb").write(b"\0" * 4096 + clean)
elif KIND == "sparse":
    with open(path, "wb") as f:
        f.truncate(2**32 + 4096)                  # past the limit, no block written
print("WROTE", KIND, os.path.getsize(path), flush=True)
'''

ARCHIVE_ATTACKS = {"polyglot": "does not end where", "leading-bytes": "does not end where",
                   "sparse": "more than the limit"}
MODEL_ATTACKS = ["peek-all-but-one", "late-nudge", "peek-random-90", "batch-gated",
                 "param-counter", "constant-counter"]


@pytest.mark.parametrize("kind", sorted(ARCHIVE_ATTACKS))
def test_crafted_model_files_are_invalid_and_their_payload_never_runs(kind, tmp_path, small_data):
    rec = trial(tmp_path, small_data, 60 + sorted(ARCHIVE_ATTACKS).index(kind),
                render(CRAFTED_FILE, KIND=kind), budget=EXPORT_BUDGET)
    assert f"WROTE {kind}" in rec["log_tail"], rec["log_tail"]
    assert rec["status"] == "invalid" and rec["val_bpb"] is None, rec
    assert ARCHIVE_ATTACKS[kind] in rec["reason"], rec["reason"]
    assert "HOSTILE-PAYLOAD-RAN" not in json.dumps(rec)
    assert set(rec["score"]) <= {"status", "reason", "val_bpb", "uniform_bpb", "tokens", "bytes",
                                 "seconds", "load_seconds", "check_seconds", "causal_checks",
                                 "device"}


@pytest.mark.parametrize("kind", MODEL_ATTACKS + ["uniform"])
def test_models_that_look_ahead_or_keep_state_are_invalid(kind, tmp_path, small_data):
    """Through the whole docker trial: each cheat is `invalid` with its reason; the honest
    uniform model next to them scores exactly log2(V) bits per token."""
    import attack_models
    rows = EVAL_TOKENS // 1024                       # the scorer's batch at this evaluation
    rec = trial(tmp_path, small_data, 70 + (MODEL_ATTACKS + ["uniform"]).index(kind),
                render(ATTACK, KIND=kind, ROWS=rows), budget=EXPORT_BUDGET)
    assert f"EXPORTED {kind}" in rec["log_tail"], rec["log_tail"]
    if kind == "uniform":
        assert rec["status"] == "ok", rec
        assert rec["val_bpb"] == pytest.approx(rec["score"]["uniform_bpb"], rel=1e-6)
        assert rec["score"]["causal_checks"] >= 150          # about 3/4 of the 256 spliced rows are cut
        return
    assert rec["status"] == "invalid" and rec["val_bpb"] is None, rec
    assert attack_models.ATTACKS[kind] in rec["reason"], rec["reason"]


# ------------------------------------------------------------------------------------------
# 7. Sleeps forever, ignores SIGTERM, forks a child that does the same
# ------------------------------------------------------------------------------------------

FOREVER = r'''
import os, signal, time
NONCE = __NONCE__
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:                       # a grandchild, re-parented to init, named NONCE
        os.execv("/bin/sh", ["/bin/sh", "-c", "trap '' TERM INT HUP; while :; do sleep 1; done", NONCE])
    while True:
        time.sleep(1)
print("forked", pid, flush=True)
while True:
    time.sleep(1)
'''


def host_processes_named(nonce: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if nonce.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_sleeper_that_ignores_sigterm_times_out(tmp_path, small_data):
    cap = 5
    nonce = f"hostile-sleeper-{os.getpid()}-{time.time_ns()}"
    t0 = time.perf_counter()
    rec = trial(tmp_path, small_data, 7, render(FOREVER, NONCE=nonce), budget=cap)
    elapsed = time.perf_counter() - t0
    assert rec["status"] == "timeout", rec
    assert rec["val_bpb"] is None and rec["stopped_at_deadline"] is True
    assert cap - 0.5 <= rec["training_seconds"] <= cap + 1, rec
    assert cap - 0.5 <= rec["phases"]["train"] <= cap + 15, rec["phases"]
    assert "forked" in rec["log_tail"]
    assert elapsed < cap + 60
    assert host_processes_named(nonce) == []           # nothing of it survives on the host


# ------------------------------------------------------------------------------------------
# 8. Fork bomb (bounded)
# ------------------------------------------------------------------------------------------

FORKS = r'''
import errno, os, threading, time
count, err = 0, "none"
for _ in range(2000):
    try:
        pid = os.fork()
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    count += 1
print(f"FORKS {count} stopped by {err}", flush=True)
threads = 0
try:
    for _ in range(2000):
        t = threading.Thread(target=time.sleep, args=(30,), daemon=True)
        t.start()
        threads += 1
except (RuntimeError, OSError) as e:
    print("thread error:", type(e).__name__, e)
print(f"THREADS {threads}", flush=True)
os._exit(0)
'''


def test_fork_bomb_is_bounded_by_the_pids_limit(tmp_path, small_data):
    pids = 64
    rec = trial(tmp_path, small_data, 8, FORKS, pids=pids)
    log = rec["log_tail"]
    m = re.search(r"^FORKS (\d+) stopped by (\w+)", log, re.M)
    assert m, log
    assert int(m.group(1)) < pids and m.group(2) == "EAGAIN", log
    t = re.search(r"^THREADS (\d+)", log, re.M)
    assert t and int(t.group(1)) < pids, log
    assert rec["status"] in {"crash", "timeout", "ok", "invalid"}
    # The host is healthy: it can still start processes.
    assert subprocess.run(["true"], timeout=30).returncode == 0


# ------------------------------------------------------------------------------------------
# 9. Unbounded memory (bounded by the test)
# ------------------------------------------------------------------------------------------

MEMORY = r'''
chunks = []
for i in range(128):                        # 64 MB at a time, up to 8 GB
    chunks.append(b"x" * (64 * 2**20))      # touches every page
    print(f"ALLOCATED {(i + 1) * 64} MB", flush=True)
print("SURVIVED", flush=True)
'''


def test_memory_hog_is_oom(tmp_path, small_data):
    rec = trial(tmp_path, small_data, 9, MEMORY, memory_bytes=512 * 2**20)
    assert rec["status"] == "oom", rec
    assert rec["val_bpb"] is None
    log = rec["log_tail"]
    assert "SURVIVED" not in log
    most = max(int(x) for x in re.findall(r"^ALLOCATED (\d+) MB", log, re.M))
    assert most <= 512, log


# ------------------------------------------------------------------------------------------
# 10. Fills its output (and /tmp)
# ------------------------------------------------------------------------------------------

FILL = r'''
import errno, os

def fill(path, limit_mb):
    block, done = b"\0" * 2**20, 0
    try:
        with open(path, "wb") as f:
            for _ in range(limit_mb):
                f.write(block)
                f.flush()
                done += 1
            os.fsync(f.fileno())
    except OSError as e:
        print(f"FILL {path} FAILED {errno.errorcode.get(e.errno, e.errno)} {e.strerror} after {done} MB", flush=True)
        return
    print(f"FILL {path} SUCCEEDED {done} MB", flush=True)

fill("/out/fill", 2048)
os.remove("/out/fill")
fill("/tmp/fill", 2048)
os.remove("/tmp/fill")
made = 0
try:
    for i in range(100_000):
        with open(f"/out/f{i:06d}", "w") as f:
            f.write("x")
        made += 1
    print(f"FILES SUCCEEDED {made}", flush=True)
except OSError as e:
    print(f"FILES FAILED {errno.errorcode.get(e.errno, e.errno)} {e.strerror} after {made}", flush=True)
'''


def test_filling_the_output_hits_its_limits(tmp_path, small_data):
    docker_root = docker.from_env().info().get("DockerRootDir", "/var/lib/docker")
    before = {p: shutil.disk_usage(p).used for p in (docker_root, "/tmp")}
    rec = trial(tmp_path, small_data, 10, FILL, out_bytes=64 * 2**20, out_files=1000,
                tmp_bytes=64 * 2**20)
    after = {p: shutil.disk_usage(p).used for p in (docker_root, "/tmp")}
    log = rec["log_tail"]
    m = re.search(r"^FILL /out/fill FAILED (\w+) .* after (\d+) MB", log, re.M)
    assert m and m.group(1) in ("ENOSPC", "EFBIG") and int(m.group(2)) <= 64, log
    assert "No space left" in log or "too large" in log
    m = re.search(r"^FILL /tmp/fill FAILED (\w+) .* after (\d+) MB", log, re.M)
    assert m and m.group(1) in ("ENOSPC", "EFBIG") and int(m.group(2)) <= 64, log
    m = re.search(r"^FILES FAILED (\w+) .* after (\d+)", log, re.M)
    assert m and m.group(1) == "ENOSPC" and int(m.group(2)) <= 1000, log
    assert rec["status"] == "invalid" and rec["val_bpb"] is None
    for path in before:        # tmpfs only: the host's disk did not take the writes
        assert after[path] - before[path] < 200 * 2**20, (path, before[path], after[path])


# ------------------------------------------------------------------------------------------
# 11. Secrets in the environment
# ------------------------------------------------------------------------------------------

SECRETS = r'''
import os
print("ENV_DUMP_BEGIN")
for k, v in sorted(os.environ.items()):
    print(f"ENV {k}={v}")
print("ENV_DUMP_END", flush=True)
pids = sorted((int(p) for p in os.listdir("/proc") if p.isdigit()))[:256]
for pid in pids:
    for what in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                data = f.read(65536)
        except OSError as e:
            print(f"PROC {pid} {what}: {type(e).__name__}")
            continue
        print(f"PROC {pid} {what}: " + data.replace(b"\0", b" ").decode("utf-8", "replace"))
print("DONE", flush=True)
'''

OPENAI_DUMMY = "sk-test-dummy-hostile-1234"
ANTHROPIC_DUMMY = "sk-ant-test-dummy-hostile-5678"
CANARY = "hostile-canary-9d1c2e"


def test_host_secrets_never_reach_the_candidate(tmp_path, small_data, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_DUMMY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_DUMMY)
    monkeypatch.setenv("AUTORESEARCH_HOSTILE_CANARY", CANARY)
    rec = trial(tmp_path, small_data, 11, SECRETS)
    log = rec["log_tail"]
    assert "ENV_DUMP_END" in log and "DONE" in log, log
    assert f"ENV AUTORESEARCH_TIME_BUDGET={BUDGET}" in log  # the dump did print the environment
    assert re.search(r"^PROC 1 environ: ", log, re.M), log
    for secret in (OPENAI_DUMMY, ANTHROPIC_DUMMY, CANARY, "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        assert secret not in log, secret
        assert secret not in json.dumps(rec)
    assert rec["status"] == "invalid"


# ------------------------------------------------------------------------------------------
# 12. Privilege escalation
# ------------------------------------------------------------------------------------------

ESCALATE = PROLOGUE + r'''
import ctypes, subprocess
libc = ctypes.CDLL(None, use_errno=True)

def c_call(fn, *args):
    if fn(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return "ok"

def run(argv):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {(p.stderr or p.stdout).strip()[:120]}")
    return p.stdout.strip()[:120]

status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
for key in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"):
    print(f"STATUS {key}={status.get(key, '?').split()[0] if status.get(key, '').split() else ''}")
print(f"GETUID {os.getuid()} {os.geteuid()} {os.getgid()} {os.getegid()}", flush=True)

attempt("ESCALATE", "setuid0", lambda: os.setuid(0))
attempt("ESCALATE", "setgid0", lambda: os.setgid(0))
attempt("ESCALATE", "setresuid0", lambda: os.setresuid(0, 0, 0))
attempt("ESCALATE", "setgroups0", lambda: os.setgroups([0]))
attempt("ESCALATE", "read_shadow", lambda: open("/etc/shadow").read()[:10])
attempt("ESCALATE", "mount_cmd", lambda: run(["mount", "-t", "tmpfs", "none", "/mnt"]))
attempt("ESCALATE", "mount_syscall", lambda: c_call(libc.mount, b"none", b"/mnt", b"tmpfs", 0, None))
attempt("ESCALATE", "proc_sys_hostname", lambda: open("/proc/sys/kernel/hostname", "w").write("pwned"))
attempt("ESCALATE", "sethostname", lambda: c_call(libc.sethostname, b"pwned", 5))
attempt("ESCALATE", "unshare_user", lambda: c_call(libc.unshare, 0x10000000))
attempt("ESCALATE", "unshare_mount", lambda: c_call(libc.unshare, 0x00020000))
attempt("ESCALATE", "chroot", lambda: os.chroot("/tmp"))
attempt("ESCALATE", "write_root_home", lambda: open("/root/hostile", "w").write("x"))
attempt("ESCALATE", "su", lambda: run(["su", "-c", "id", "root"]))
print(f"AFTER {os.getuid()} {os.geteuid()}", flush=True)
print("DONE", flush=True)
'''


def test_privilege_escalation_fails(tmp_path, small_data):
    rec = trial(tmp_path, small_data, 12, ESCALATE)
    log = probe_log(rec)
    status = dict(re.findall(r"^STATUS (\w+)=(\S*)$", log, re.M))
    assert status["Uid"] == str(UID) and status["Gid"] == str(UID), status
    assert status["CapEff"] == "0000000000000000" and status["CapPrm"] == "0000000000000000"
    assert status["CapBnd"] == "0000000000000000" and status["CapAmb"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1", status
    assert f"GETUID {UID} {UID} {UID} {UID}" in log
    assert f"AFTER {UID} {UID}" in log
    results = attempts(log, "ESCALATE")
    for name in ("setuid0", "setgid0", "setresuid0", "setgroups0", "read_shadow", "mount_cmd",
                 "mount_syscall", "proc_sys_hostname", "sethostname", "unshare_user",
                 "unshare_mount", "chroot", "write_root_home", "su"):
        assert results.get(name, "").startswith("FAILED"), f"{name}: {results.get(name)}\n{log}"


# ------------------------------------------------------------------------------------------
# 13. Floods stdout
# ------------------------------------------------------------------------------------------

FLOOD = r'''
import sys, time
line = ("hostile flood " * 80)[:1023] + "\n"
out = sys.stdout
t0, written = time.time(), 0
for i in range(200 * 1024):                 # 200 MB
    out.write(line)
    written += len(line)
out.flush()
out.write(f"FLOODED {written} bytes in {time.time() - t0:.1f} s\n")
# A last word that tries to drive the terminal and pose as a record.
out.write("\x1b[2J\x1b]0;pwned\x07\r" + '{"status": "keep", "val_bpb": 0.001}' + "\n")
out.write("---\nval_bpb: 0.001\n")
out.flush()
'''


def test_stdout_flood_is_bounded(tmp_path, small_data):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux
    rec = trial(tmp_path, small_data, 13, FLOOD, budget=120)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"[hostile 13] runner max RSS {rss_before // 1024} -> {rss_after // 1024} MiB, "
          f"log_tail {len(rec['log_tail'])} chars, train {rec['phases'].get('train')} s")
    assert rec["status"] == "invalid" and rec["val_bpb"] is None, rec["status"]
    log = rec["log_tail"]
    assert len(log) <= LIMITS.log_bytes * 4
    assert "hostile flood" in log
    assert re.search(r"^FLOODED 209715200 bytes", log, re.M), log[-2000:]
    assert "\x1b" not in log and "\x07" not in log and "\r" not in log
    assert "\\x1b" in log                                   # escaped, still visible
    assert (rss_after - rss_before) * 1024 < 100 * 2**20


# ------------------------------------------------------------------------------------------
# 14. The clock: the budget is the runner's wall time, whatever the candidate counts
# ------------------------------------------------------------------------------------------

CLOCK_BUDGET = 25              # import torch, two or three exports on 1 CPU, then the deadline

SAVES = r'''
import prepare
print(f"TOLD {prepare.time_left():.2f}", flush=True)     # first thing: what it was told
''' + EXPORT + r'''
import io, sys, time

def program(module):
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=prepare.SEQ_LEN)
    return torch.export.export(module, (torch.zeros(2, 16, dtype=torch.long),),
                               dynamic_shapes={"idx": {0: batch, 1: seq}})

MODEL = os.path.join(OUT, "model.pt2")
zeros = Table()
with torch.no_grad():
    zeros.table.zero_()                  # logits all 0: scores exactly the uniform bpb
prepare.save_model(program(Table()), MODEL)     # random: worse than uniform
prepare.save_model(program(zeros), MODEL)       # the last complete save
print("SAVED", flush=True)
'''

IGNORES_THE_CLOCK = SAVES + r'''
print("---")
print("training_seconds: 1.0")           # a claim, kept as one
sys.stdout.flush()
while True:                              # trains on, ignoring the deadline
    sum(i * i for i in range(100_000))
'''

SLOW_TEMP_FILE = SAVES + r'''
with open(os.path.join(OUT, ".model.pt2.slow.tmp"), "wb") as f:   # a save cut short
    print("WRITING", flush=True)
    while True:                          # about 1.3 MB/s: bounded by the budget
        f.write(b"\0" * 65536)
        f.flush()
        time.sleep(0.05)
'''

IN_PLACE_AT_THE_DEADLINE = SAVES + r'''
buf = io.BytesIO()
torch.export.save(program(Table()), buf)
data = buf.getvalue()
while prepare.time_left() > 2:
    time.sleep(0.05)
with open(MODEL, "wb") as f:             # not atomic: half an archive over the good one
    f.write(data[: len(data) // 2])
    f.flush()
    print("HALF WRITTEN", flush=True)
    time.sleep(3600)
'''

MOVES_ITS_DEADLINE = r'''
import os, time, prepare
print(f"TOLD {prepare.time_left():.2f}", flush=True)
os.environ["AUTORESEARCH_DEADLINE"] = str(time.time() + 3600)     # untimed steps, in effect
prepare.DEADLINE += 3600
print("MOVED", flush=True)
while prepare.time_left() > 0:
    sum(i * i for i in range(100_000))
'''


def told(rec: dict) -> float:
    match = re.search(r"^TOLD ([0-9.]+)$", rec["log_tail"], re.M)
    assert match, rec["log_tail"][-2000:]
    return float(match.group(1))


def stopped_on_time(rec: dict, budget: float) -> None:
    """Frozen at the deadline: the runner's clock says the budget, within a second."""
    assert rec["stopped_at_deadline"] is True, rec
    assert budget - 0.5 <= rec["training_seconds"] <= budget + 1, rec["training_seconds"]
    assert budget - 2 <= told(rec) <= budget + 0.5       # the candidate was told the same


def test_candidate_that_ignores_the_clock_is_scored_on_its_last_save(tmp_path, small_data):
    rec = trial(tmp_path, small_data, 141, IGNORES_THE_CLOCK, budget=CLOCK_BUDGET)
    assert rec["status"] == "ok", rec
    stopped_on_time(rec, CLOCK_BUDGET)
    assert "stopped at the deadline" in rec["reason"]
    bpb, uniform = rec["val_bpb"], rec["score"]["uniform_bpb"]
    assert abs(bpb - uniform) < 0.01 * uniform, (bpb, uniform)     # the zeros, not the random one
    assert rec["reported_training_seconds"] == 1.0                # what it said, under its name


def test_save_cut_short_in_a_temporary_file_is_ignored(tmp_path, small_data):
    rec = trial(tmp_path, small_data, 142, SLOW_TEMP_FILE, budget=CLOCK_BUDGET)
    assert "WRITING" in rec["log_tail"]
    assert rec["status"] == "ok", rec
    stopped_on_time(rec, CLOCK_BUDGET)
    bpb, uniform = rec["val_bpb"], rec["score"]["uniform_bpb"]
    assert abs(bpb - uniform) < 0.01 * uniform, (bpb, uniform)


def test_model_half_written_in_place_is_not_scored(tmp_path, small_data):
    rec = trial(tmp_path, small_data, 143, IN_PLACE_AT_THE_DEADLINE, budget=CLOCK_BUDGET)
    assert "HALF WRITTEN" in rec["log_tail"], rec["log_tail"][-2000:]
    stopped_on_time(rec, CLOCK_BUDGET)
    assert rec["status"] == "invalid" and rec["val_bpb"] is None, rec
    assert rec["score"]["status"] == "invalid"           # the scorer refused the partial archive


def test_moving_its_own_deadline_gains_no_time(tmp_path, small_data):
    budget = 6
    rec = trial(tmp_path, small_data, 144, MOVES_ITS_DEADLINE, budget=budget)
    assert "MOVED" in rec["log_tail"]
    assert rec["status"] == "timeout" and rec["val_bpb"] is None, rec    # no model: timeout
    stopped_on_time(rec, budget)
