"""Which launcher started this process, and running a training under it as one job.

A multi-process job is started one of three ways; each gives ONE job of world size N (one
``log.txt``, one set of checkpoints, one OUTPUT_DIR lock):

* detectron2's flags ``--num-gpus N [--num-machines M --machine-rank R --dist-url tcp://HOST:PORT]``:
  this process is its machine's launcher and starts N workers (:func:`cpm_d2.compat.launch`);
* ``torchrun``: this process is one rank; ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT`` (and ``GROUP_RANK``) describe it;
* SLURM ``srun``, one task per GPU: ``SLURM_PROCID`` (rank), ``SLURM_STEP_NUM_TASKS`` or
  ``SLURM_NTASKS`` (world size, > 1), ``SLURM_LOCALID`` (local rank), ``SLURM_NODEID`` (machine),
  ``MASTER_ADDR`` or else the first host of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST``
  (compressed lists such as ``node[01-03,07]`` are expanded), ``MASTER_PORT`` or else
  ``SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN`` (the same for every task of a job).

Mixed or inconsistent settings raise :class:`LaunchError` saying what to run instead: the
``--num-gpus`` / ``--num-machines`` / ``--machine-rank`` / ``--dist-url`` flags inside a process
that torchrun or SLURM started (they would start a second job in each rank), a partial torchrun
environment (``WORLD_SIZE`` without ``RANK``), or a ``WORLD_SIZE`` that disagrees with SLURM's.

The OUTPUT_DIR guard (lock and checks, ``guard`` of :func:`launch_job`) is held by one process
per job: machine 0's launcher for ``--num-gpus``, global rank 0 under torchrun and SLURM.
"""
import contextlib
import os
import re
import sys
from dataclasses import dataclass

__all__ = ["LaunchError", "ExternalLaunch", "expand_nodelist", "detect_launch", "check_flags", "launch_job"]

SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 50000
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(ValueError):
    """The launcher's environment and the command-line flags do not describe one job."""


@dataclass(frozen=True)
class ExternalLaunch:
    """This process is ``rank`` of ``world_size``, started by ``launcher`` ("torchrun" or "SLURM")."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    node: str
    master_addr: str
    master_port: int

    def environ(self):
        """The variables ``init_process_group("env://")`` and :func:`cpm_d2.compat.run_rank` read."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "GROUP_RANK": self.node, "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def _split_top_level(text):
    """``a,b[1-2,5],c`` -> ``["a", "b[1-2,5]", "c"]`` (commas inside brackets do not split)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0:
            raise ValueError(f"unbalanced ']' in node list {text!r}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(spec, text):
    """``01-03,07`` -> ``["01", "02", "03", "07"]`` (zero padding kept)."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in node list {text!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"bad range {item!r} in node list {text!r}")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist):
    """SLURM's compressed host list -> host names, in order: ``"node[01-03,07],gpu5"`` ->
    ``["node01", "node02", "node03", "node07", "gpu5"]``; several brackets in one name
    (``rack[1-2]-n[1-2]``) expand to every combination. Raises ValueError naming a malformed list."""
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        names = [""]
        for literal, spec in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            if spec:
                names = [n + literal + x for n in names for x in _expand_range(spec, nodelist)]
            elif literal:
                names = [n + literal for n in names]
        hosts += names
    if not hosts:
        raise ValueError(f"node list {nodelist!r} names no host")
    return hosts


def _int(environ, name, launcher):
    value = environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"{launcher} environment: {name}={value!r} is not an integer") from None


def _torchrun_launch(environ):
    present = [k for k in _TORCHRUN_VARS if k in environ]
    if not any(k in environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None  # MASTER_ADDR / MASTER_PORT alone: SLURM jobs may set them
    missing = [k for k in _TORCHRUN_VARS if k not in environ]
    if missing:
        raise LaunchError(
            f"{', '.join(f'{k}={environ[k]}' for k in present)} {'is' if len(present) == 1 else 'are'} set but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: start the job with torchrun (it sets "
            "all of them), or unset these variables and pass --num-gpus N"
        )
    rank, world = _int(environ, "RANK", "torchrun"), _int(environ, "WORLD_SIZE", "torchrun")
    local_rank, port = _int(environ, "LOCAL_RANK", "torchrun"), _int(environ, "MASTER_PORT", "torchrun")
    if not 0 <= rank < world:
        raise LaunchError(f"torchrun environment: RANK={rank} is not in 0 .. WORLD_SIZE-1 = {world - 1}")
    node = environ.get("GROUP_RANK") or environ.get("SLURM_NODEID") or _hostname()
    return ExternalLaunch("torchrun", rank, world, local_rank, str(node), environ["MASTER_ADDR"], port)


def _hostname():
    import socket

    return socket.gethostname()


def _slurm_world(environ):
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        if name in environ:
            return name, _int(environ, name, "SLURM")
    return None, 1


def _slurm_launch(environ):
    name, world = _slurm_world(environ)
    if "SLURM_PROCID" not in environ or world <= 1:
        return None
    rank = _int(environ, "SLURM_PROCID", "SLURM")
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM environment: SLURM_PROCID={rank} is not in 0 .. {name}-1 = {world - 1}")
    if "SLURM_LOCALID" not in environ:
        raise LaunchError("SLURM environment: SLURM_PROCID is set but SLURM_LOCALID is not; start the tasks with srun")
    local_rank = _int(environ, "SLURM_LOCALID", "SLURM")
    addr = environ.get("MASTER_ADDR")
    if not addr:
        nodelist = next((environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if environ.get(k)), None)
        if nodelist is None:
            raise LaunchError("SLURM environment: no SLURM_JOB_NODELIST to find the master node; set MASTER_ADDR")
        try:
            addr = expand_nodelist(nodelist)[0]
        except ValueError as e:
            raise LaunchError(f"SLURM environment: {e}; set MASTER_ADDR to the first node's address") from None
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT", "SLURM")
    else:
        job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
        if not job or not job.isdigit():
            raise LaunchError(f"SLURM environment: SLURM_JOB_ID={job!r} gives no port; set MASTER_PORT")
        port = SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN
    node = environ.get("SLURM_NODEID") or _hostname()
    return ExternalLaunch("SLURM", rank, world, local_rank, str(node), addr, port)


def detect_launch(environ=None):
    """The :class:`ExternalLaunch` torchrun or SLURM describe in ``environ`` (default ``os.environ``),
    or None when neither started this process (or SLURM runs a single task). torchrun's variables win
    over SLURM's (torchrun inside an srun task). Raises :class:`LaunchError` for an inconsistent one."""
    environ = os.environ if environ is None else environ
    launch = _torchrun_launch(environ)
    if launch is not None:
        name, slurm_world = _slurm_world(environ)
        if "TORCHELASTIC_RUN_ID" not in environ and name and slurm_world > 1 and slurm_world != launch.world_size:
            raise LaunchError(
                f"WORLD_SIZE={launch.world_size} disagrees with SLURM's {name}={slurm_world}: unset WORLD_SIZE, RANK, "
                "LOCAL_RANK, MASTER_ADDR and MASTER_PORT to let srun's tasks form the job, or start one srun task per "
                "machine with torchrun in it"
            )
        return launch
    return _slurm_launch(environ)


def check_flags(args, launch, default_dist_url=None):
    """Raise :class:`LaunchError` when the detectron2 launch flags of ``args`` clash with ``launch``
    (an :class:`ExternalLaunch`, or None for the flags alone)."""
    if launch is None:
        if args.num_gpus < 1 or args.num_machines < 1:
            raise LaunchError(f"--num-gpus {args.num_gpus} --num-machines {args.num_machines}: both must be >= 1")
        if not 0 <= args.machine_rank < args.num_machines:
            raise LaunchError(f"--machine-rank {args.machine_rank} must be in 0 .. --num-machines - 1 = "
                              f"{args.num_machines - 1}")
        return
    given = []
    if args.num_gpus != 1:
        given.append(f"--num-gpus {args.num_gpus}")
    if args.num_machines != 1:
        given.append(f"--num-machines {args.num_machines}")
    if args.machine_rank != 0:
        given.append(f"--machine-rank {args.machine_rank}")
    if default_dist_url is not None and args.dist_url != default_dist_url:
        given.append(f"--dist-url {args.dist_url}")
    if not given:
        return
    if launch.launcher == "torchrun":
        instead = ("torchrun --nproc_per_node N [--nnodes M --node_rank R --master_addr HOST --master_port PORT] "
                   "tools/train_net.py --config-file ... (without these flags), or python tools/train_net.py "
                   f"{' '.join(given)} ... without torchrun")
    else:
        instead = ("srun --ntasks-per-node N python tools/train_net.py --config-file ... (one task per GPU, without "
                   f"these flags), or one SLURM task running python tools/train_net.py {' '.join(given)} ...")
    raise LaunchError(
        f"{launch.launcher} started this process as rank {launch.rank} of WORLD_SIZE={launch.world_size}, but "
        f"{', '.join(given)} would start another job inside it: {launch.launcher} already starts one process per "
        f"GPU. Run {instead}"
    )


def _guarded(main_func, args, guard):
    """Inside the process group: global rank 0 enters ``guard()`` around ``main_func(args)``; its failure
    ends every rank (the others exit 1 with one line naming it, rank 0 raises it)."""
    from detectron2.utils import comm

    with contextlib.ExitStack() as stack:
        error = None
        if comm.is_main_process() and guard is not None:
            try:
                stack.enter_context(guard())
            except Exception as e:  # noqa: BLE001  (shared with the other ranks, then raised)
                error = e
        first = comm.all_gather(None if error is None else f"{type(error).__name__}: {error}")[0]
        if error is not None:
            raise error
        if first is not None:
            print(f"rank {comm.get_rank()}: rank 0 did not start the job: {first}", file=sys.stderr, flush=True)
            raise SystemExit(1)
        return main_func(args)


def launch_job(main_func, args, *, guard=None, default_dist_url=None, environ=None):
    """Run ``main_func(args)`` as the one job that the environment and ``args``' launch flags describe.

    ``guard``: a callable returning a context manager (e.g. the OUTPUT_DIR lock) that the job's one
    owning process enters around the whole job. ``default_dist_url``: the parser's ``--dist-url``
    default, to tell a given one apart. Returns what ``main_func`` returns (rank 0's, when spawned).
    """
    from ..compat import launch, run_rank

    external = detect_launch(environ)
    check_flags(args, external, default_dist_url)
    if external is None:
        with guard() if guard is not None and args.machine_rank == 0 else contextlib.nullcontext():
            return launch(main_func, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                          dist_url=args.dist_url, args=(args,))
    if external.world_size == 1:
        with guard() if guard is not None else contextlib.nullcontext():
            return main_func(args)
    os.environ.update(external.environ())
    return run_rank(_guarded, (main_func, args, guard))
