"""Two "nodes" on one machine: launch/train.py under two torchrun agents (--nnodes 2 --node_rank 0/1, one rank
each, static rendezvous on 127.0.0.1) into one shared output folder. The run ends with the single-node
result; no file is written by two processes; rank 0 alone holds the lock; after a SIGKILL of node 1 mid-run,
`--resume auto` on both nodes ends exactly like the uninterrupted run; a node that sees its own node-local
output folder is refused on every rank before anything is written.

Who writes what: a sitecustomize on the ranks' PYTHONPATH installs an audit hook that logs every
write-open, rename, removal and directory creation under the output folder to a per-process file. (Files
that DeepSpeed's torch.save writes from C++ by path are not seen; the driver's and the plugin's are.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_driver import BIN, TRAIN, free_port

from aim_ds.driver.lock import LOCK_NAME, check_free
from tests.mp import driver_env

TIMEOUT = 300
# 8 driver steps per task on 2 ranks (32 examples, batch 2 x 2), checkpoints every 4: inside every task
ARGS = ["--method", "aim", "--max-train", "32", "--max-eval", "16", "--batch-size", "2", "--eval-batch-size", "16"]
ARGS += ["--no-progress", "--checkpoint-every", "4", "--seed", "1", "--dist-timeout", "60"]

AUDIT = """
import json, os, sys
_root = os.environ.get("AIM_DS_AUDIT_ROOT")
_log = os.environ.get("AIM_DS_AUDIT_LOG")
if _root and _log:
    _events = {"open", "os.rename", "os.replace", "os.remove", "os.unlink", "os.mkdir", "os.truncate"}

    def _hook(event, args):
        if event not in _events or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if event == "open":
            mode, flags = args[1], args[2]
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR)):
                return
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(_root):
            with open(f"{_log}/{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps([os.environ.get("RANK"), event, path]) + "\\n")

    sys.addaudithook(_hook)
"""


def env(tmp: Path, out: Path | None = None) -> dict:
    e = driver_env(tmp)
    if out is not None:  # the audit hook, on the ranks only (its open() of the log is outside the root)
        site = tmp / "audit-site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(AUDIT)
        (tmp / "audit").mkdir(exist_ok=True)
        e.update(AIM_DS_AUDIT_ROOT=str(out), AIM_DS_AUDIT_LOG=str(tmp / "audit"))
        e["PYTHONPATH"] = str(site) + os.pathsep + e["PYTHONPATH"]
    return e


def node(tmp: Path, node_rank: int, port: int, out: Path, *extra, audit: bool = False):
    cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), TRAIN, *ARGS, "--output-dir", str(out), *extra]
    log = open(tmp / f"node{node_rank}-{time.time_ns()}.log", "w")
    p = subprocess.Popen(
        cmd,
        cwd=str(tmp),
        env=env(tmp, out if audit else None),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    p.log = Path(log.name)
    return p


def descendants(pid: int) -> list[int]:
    """Every process below pid (/proc children lists): torchrun's workers run in their own process group."""
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        for task in Path(f"/proc/{cur}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def kill(p) -> None:
    """SIGKILL the node: its agent's process group and every process below the agent."""
    procs = descendants(p.pid)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(timeout=30)


def wait(p, timeout=TIMEOUT) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(p)
        pytest.fail(f"timed out: {p.log.read_text()[-3000:]}")


def two_nodes(tmp: Path, out: Path, *extra, audit: bool = False) -> tuple[int, int, str]:
    port = free_port()
    ps = [node(tmp, r, port, out, *extra, audit=audit) for r in (0, 1)]
    try:
        codes = [wait(p) for p in ps]
    finally:
        for p in ps:
            if p.poll() is None:
                kill(p)
    return codes[0], codes[1], ps[0].log.read_text() + ps[1].log.read_text()


def single_node(tmp: Path, out: Path) -> None:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), TRAIN, *ARGS]
    p = subprocess.run(
        cmd + ["--output-dir", str(out)], cwd=str(tmp), env=env(tmp), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]


def outcome(out: Path) -> dict:
    r = json.loads((out / "results.json").read_text())
    return {
        "matrix": r["matrix"],
        "merges": r["merges"],
        "steps": r["steps"],
        "trajectory": (out / "trajectory.csv").read_text(),
        "losses": (out / "losses.csv").read_text(),
    }


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    single_node(tmp, tmp / "out")
    return outcome(tmp / "out")


def test_two_nodes_single_node_result_one_writer_per_file(tmp_path, ref):
    out = tmp_path / "out"
    c0, c1, log = two_nodes(tmp_path, out, audit=True)
    assert c0 == 0 and c1 == 0, log[-4000:]
    r = json.loads((out / "results.json").read_text())
    assert r["world_size"] == 2 and r["launcher"] == "env"
    assert outcome(out) == ref
    writers: dict[str, set] = {}
    for f in (tmp_path / "audit").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            rank, event, path = json.loads(line)
            if event != "os.mkdir":  # DeepSpeed's makedirs(exist_ok=True) of a checkpoint folder runs on every rank
                writers.setdefault(path, set()).add((rank, f.stem))
    assert writers, "the audit hook saw no writes"
    shared = {p: w for p, w in writers.items() if len(w) > 1}
    assert not shared, shared  # every file and folder is written by one process
    lock = [w for p, w in writers.items() if p.endswith(".aim_ds.lock")]
    assert lock and all(w == lock[0] for w in lock) and {r for r, _ in lock[0]} == {"0"}, lock
    plugin_files = {p for p, w in writers.items() if "aim_plugin_rank00001" in p}
    assert plugin_files and all({r for r, _ in writers[p]} == {"1"} for p in plugin_files)  # node 1 wrote its own


def test_node_killed_then_resume_auto_on_both_nodes(tmp_path, ref):
    out = tmp_path / "out"
    port = free_port()
    ps = [node(tmp_path, r, port, out) for r in (0, 1)]
    try:
        latest = out / "checkpoints" / "latest"
        deadline = time.time() + TIMEOUT
        while not (latest.exists() and latest.read_text().startswith("task001-step")):
            if any(p.poll() is not None for p in ps) or time.time() > deadline:
                pytest.fail("no task-1 checkpoint: " + ps[0].log.read_text()[-3000:])
            time.sleep(0.1)
        kill(ps[1])  # node 1 lost: its agent and rank
        try:  # node 0's rank fails its next collective (peer gone) and its agent exits; else it is killed too
            ps[0].wait(timeout=90)
        except subprocess.TimeoutExpired:
            kill(ps[0])
    finally:
        for p in ps:
            if p.poll() is None:
                kill(p)
    assert not (out / "results.json").exists()
    if ps[0].returncode >= 0:  # node 0 ended by itself (its rank's next collective failed), not by our SIGKILL
        assert not (out / LOCK_NAME).exists(), ps[0].log.read_text()[-3000:]  # rank 0 released the lock on its way out
    # either way the holder is gone: no live process holds the lock (a SIGKILL leaves the file, not its flock), so
    # the resume below takes it over; check_free raises LockError while a process holds it
    check_free(str(out))
    c0, c1, log = two_nodes(tmp_path, out, "--resume", "auto")
    assert c0 == 0 and c1 == 0, log[-4000:]
    assert "resuming from" in log
    assert outcome(out) == ref


def test_node_local_output_folders_are_refused(tmp_path):
    """Node 1 sees its own folder (as with node-local disks): one clear error on both nodes, nothing left."""
    port = free_port()
    a, b = tmp_path / "node0" / "out", tmp_path / "node1" / "out"
    ps = [node(tmp_path, 0, port, a), node(tmp_path, 1, port, b)]
    try:
        codes = [wait(p, 180) for p in ps]
    finally:
        for p in ps:
            if p.poll() is None:
                kill(p)
    logs = [p.log.read_text() for p in ps]
    for code, log in zip(codes, logs):
        assert code != 0, log[-3000:]
        assert "does not see the lock file rank 0 wrote there" in log and "Node-local" in log, log[-3000:]
    assert not a.exists() and not b.exists()


def _mpirun() -> bool:
    import shutil

    return (BIN / "mpirun").exists() or shutil.which("mpirun") is not None


@pytest.mark.skipif(not _mpirun(), reason="no mpirun (pip install mpich into the venv)")
def test_deepspeed_launcher_hostfile_two_hosts_without_ssh(tmp_path):
    """DeepSpeed's launcher with a two-host hostfile (localhost and 127.0.0.1, one slot each) and its mpich
    launcher: MPICH's hydra starts one rank per "host" without ssh (both names are this machine)."""
    (tmp_path / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "out"
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"), "--force_multi", "--no_ssh_check"]
    cmd += ["--launcher", "mpich", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), TRAIN]
    cmd += ["--method", "seqft", "--max-train", "8", "--max-eval", "4", "--batch-size", "2", "--no-progress"]
    e = env(tmp_path)
    e["PATH"] = str(BIN) + os.pathsep + e.get("PATH", "")  # the venv's mpirun
    p = subprocess.run(
        cmd + ["--output-dir", str(out)], cwd=str(tmp_path), env=e, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "-ppn 1" in p.stdout + p.stderr and "-hosts localhost,127.0.0.1" in p.stdout + p.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["world_size"] == 2 and len(r["matrix"]) == 4
