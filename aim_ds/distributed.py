"""Process-group initialisation that works under every launcher the project supports.

Supported launchers (detected in this order):

* ``deepspeed --num_gpus N script.py`` / ``deepspeed --hostfile H ...`` and ``torchrun``: they export
  RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; we only read them.
* ``mpirun -np N python script.py`` (Open MPI: OMPI_COMM_WORLD_*; MPICH/Hydra and Slurm's PMI: PMI_*):
  the environment says nothing torch.distributed understands, so we ask mpi4py's COMM_WORLD for the
  rank and size, derive the local rank from a node-local split communicator, and have rank 0 pick a
  free TCP port that it broadcasts to everybody.  MASTER_ADDR defaults to 127.0.0.1 (DeepSpeed's own
  MPI discovery would take the host's non-loopback address, which is wrong on single-node boxes and
  breaks in containers).  For multi-node MPI runs set MASTER_ADDR yourself to rank 0's host.
* no launcher: a single process, world size 1 (RANK=0, WORLD_SIZE=1, a free port on 127.0.0.1).

Then ``deepspeed.init_distributed`` is called with the backend the accelerator wants (gloo on CPU
without oneCCL) and a SHORT timeout (default 300 s, ``AIM_DS_DIST_TIMEOUT`` overrides): a rank-asymmetric
bug must fail with an error instead of hanging a job (or CI) for torch's default 10-30 minutes.

OMP_NUM_THREADS: the deepspeed launcher leaves it unset, so each rank would start one OpenMP thread per
core; with N ranks on a node that is N x cores threads fighting for the cores (and spinning in OpenMP
barriers), which is several times slower than one thread per rank on small CPU machines.  When it is
unset (or empty) and more than one rank shares the node we set it to max(1, cores // local_world_size).  It must
happen before torch's intra-op pool starts, so this module also applies it at import time if the
launcher environment already says how many local ranks there are; ``torch.set_num_threads`` is called
as well for the case where torch was already imported.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # "env" (deepspeed/torchrun), "mpi", or "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free on this host right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_ranks(
    cmd_for_rank, world: int, log_dir: str, timeout: float, env: dict | None = None, cwd: str | None = None
) -> tuple[list[int | None], bool]:
    """Start `world` local processes, cmd_for_rank(rank, port) each, with RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR=127.0.0.1 and MASTER_PORT (one free port) set, stdout and stderr in
    log_dir/rank<R>.log; wait for all of them. Returns (exit codes, timed_out): on timeout every rank is
    killed, so a rank-asymmetric bug fails in minutes instead of hanging a job."""
    import subprocess
    import time

    port = free_port()
    base = dict(os.environ if env is None else env)
    base.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs, logs = [], []
    try:
        for r in range(world):
            log = open(os.path.join(log_dir, f"rank{r}.log"), "w")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    cmd_for_rank(r, port),
                    cwd=cwd,
                    env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + timeout
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for log in logs:
            log.close()
    return [p.returncode for p in procs], timed_out


def _mpi_env_present() -> bool:
    keys = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")
    return any(k in os.environ for k in keys)


def detect_launcher() -> str:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "env"
    if _mpi_env_present():
        return "mpi"
    return "none"


def _local_world_size_hint() -> int | None:
    for k in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"):
        if k in os.environ:
            try:
                return int(os.environ[k])
            except ValueError:
                pass
    return None


def set_omp_threads(local_world_size: int | None) -> None:
    """OMP_NUM_THREADS = cores // local ranks when unset and several ranks share the node (see module doc)."""
    # an empty value sets nothing (OpenMP then starts one thread per core), so it counts as unset
    if os.environ.get("OMP_NUM_THREADS", "").strip() or not local_world_size or local_world_size <= 1:
        return
    n = max(1, (os.cpu_count() or 1) // local_world_size)
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        import sys

        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(n)
    except Exception:  # pragma: no cover - best effort
        pass


def _setup_mpi_env() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    port = os.environ.get("MASTER_PORT")
    if port is None:
        port = comm.bcast(str(free_port()) if rank == 0 else None, root=0)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_size),
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def setup_env() -> DistInfo:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for the detected launcher (no process group yet)."""
    launcher = detect_launcher()
    if launcher == "mpi":
        _setup_mpi_env()
    elif launcher == "none":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = _local_world_size_hint()
    if local_world is None:
        # deepspeed's launcher does not export LOCAL_WORLD_SIZE; on a single node it equals WORLD_SIZE,
        # and CROSS_SIZE (set by deepspeed's launcher) tells how many nodes there are.
        nodes = int(os.environ.get("CROSS_SIZE", os.environ.get("GROUP_WORLD_SIZE", "1")) or 1)
        local_world = max(1, world // max(1, nodes))
    set_omp_threads(local_world)
    return DistInfo(rank, world, local_rank, local_world, launcher)


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Set up the environment for the launcher in use, then ``deepspeed.init_distributed``.

    Safe to call twice (the second call only returns the info)."""
    info = setup_env()
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if timeout_s is None:
        timeout_s = float(os.environ.get("AIM_DS_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not dist.is_initialized():
        backend = get_accelerator().communication_backend_name()
        if get_accelerator().device_name() == "cpu" and backend == "ccl":
            try:
                import oneccl_bindings_for_pytorch  # noqa: F401
            except ImportError:
                backend = "gloo"
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            rank=info.rank,
            world_size=info.world_size,
        )
        release_cpu_shm_names()
    return info


def cpu_shm_path(rank: int | None = None) -> str:
    """The /dev/shm file DeepSpeed's CPU shm all-reduce (``deepspeed_shm_comm``) creates for ``rank``."""
    import torch.distributed as dist

    rank = dist.get_rank() if rank is None else rank
    return (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    )


def release_cpu_shm_names() -> bool:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name once every rank has mapped it (collective).

    On the CPU accelerator, ``init_distributed`` creates a ~69 MB POSIX shared-memory file per rank in
    /dev/shm, named by MASTER_ADDR/MASTER_PORT/rank, maps every peer's, and never unlinks them (deepspeed
    0.19.8): every run leaks world x 69 MB of RAM-backed tmpfs until /dev/shm fills, and a later run on the
    same port may map a dead run's buffer. After a barrier every rank has mapped every peer (the mapping is
    made inside init), so each rank unlinks its own name: the mappings stay valid and the kernel frees the
    memory when the last rank exits, even on SIGKILL. Returns whether a file was removed. No-op off CPU."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not (dist.is_available() and dist.is_initialized()) or get_accelerator().device_name() != "cpu":
        return False
    dist.barrier()
    try:
        os.unlink(cpu_shm_path())
        return True
    except FileNotFoundError:
        return False


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def prebuild_ops() -> list[str]:
    """JIT-build (once, into TORCH_EXTENSIONS_DIR) the DeepSpeed ops the default CPU path loads at start-up.

    On the CPU accelerator every ``init_distributed`` loads ``deepspeed_shm_comm``; the first load compiles
    it (~45 s idle, ~100 s on a busy 2-core box), which would otherwise land in the first training run.
    Set-up scripts call: ``python -c "from aim_ds.distributed import prebuild_ops; prebuild_ops()"``
    with the same TORCH_EXTENSIONS_DIR as the runs (launch/train.py defaults it to <repo>/.cache/torch_extensions).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    built = []
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load()
        built.append(builder.NAME)
    return built
