"""Where this process runs: its rank and world size, its GPU, the CPUs it may use, and how a preempted
run gets requeued. All cluster knowledge (explicit settings, torchrun, Slurm, Hydra's Slurm launcher)
lives here.

Rank: `dist.rank`/`dist.world_size` when given, else torchrun's RANK/WORLD_SIZE, else Slurm's array
and task ids. GPU: LOCAL_RANK's (torchrun) or SLURM_LOCALID's among the visible ones. CPUs: Slurm's
--cpus-per-task, else this process's share of the affinity mask among the job's processes on its node.
"""

from __future__ import annotations

import logging
import os
import signal

from pipeline.errors import UserError

log = logging.getLogger(__name__)

GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")


def rank_and_world(dist) -> tuple[int, int]:
    """(rank, world size): dist.* overrides, else torchrun, else Slurm (array index × tasks + task id).
    Slurm's array index counts tasks, so `--array=0-30:2` gives indices 0…15 like `--array=0-15`."""
    env = os.environ
    if dist.rank is not None or dist.world_size is not None:
        rank, world = dist.rank or 0, dist.world_size or 1
    elif "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    else:
        tasks, proc = int(env.get("SLURM_NTASKS", 1)), int(env.get("SLURM_PROCID", 0))
        arrays = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
        offset = int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        array_index = offset // int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        rank, world = array_index * tasks + proc, arrays * tasks
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside world size {world} (dist.rank / dist.world_size)")
    return rank, world


def verification_id(given: str | None, world: int) -> str:
    """Which verification this rank of `jobs.verify` belongs to: `given`, else the tasks of one Slurm array
    share its job id and the tasks of one srun step their job and step ids. Ranks given by hand must name
    theirs, so that the records of an earlier verification are never merged into this one."""
    env = os.environ
    found = str(given or env.get("SLURM_ARRAY_JOB_ID")
                or (f"{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}" if "SLURM_STEP_ID" in env else ""))
    if world > 1 and not found:
        raise UserError("verify.id=… is required with ranks outside a Slurm array or srun step: the same id on "
                        "every rank of one verification, a new one for the next")
    return found


def local_rank() -> int:
    """This process's index among those on its node: torchrun's LOCAL_RANK, else Slurm's SLURM_LOCALID."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def given_gpus() -> str | None:
    """The GPUs the scheduler or the user gave this process (the first variable that names any)."""
    for name in GPU_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value not in ("-1", "NoDevFiles"):
            return f"{name}={value}"
    return None


def resolve_device(name: str):
    """`cpu`; `cuda` (this process's GPU, or a user error); `auto`: the GPU when CUDA works, the CPU when
    no GPU was given. A GPU given but unusable (a driver too old for this CUDA build, say) ends the run
    before any work: an overnight run on the CPU by accident is worse than no run."""
    import torch  # here, not at the top: the rank rule is also read before torch is (for Hydra's log folder)

    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        # With all of a node's GPUs visible, each task picks its own by local rank; with one visible
        # (--gpus-per-task=1), that one.
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    given = given_gpus()
    if name == "cuda" or given:
        reason = cuda_error()
        where = f" although {given}" if given else ""
        raise UserError(f"device={name}: CUDA cannot be used{where} ({reason}); fix the node, or run on the CPU on "
                        "purpose with device=cpu")
    return torch.device("cpu")


def cuda_error() -> str:
    """Why CUDA is not available, in torch's words."""
    import torch

    try:
        torch.cuda.init()
    except Exception as e:  # torch raises RuntimeError or AssertionError, depending on the build
        return " ".join(str(e).split())[:200] or type(e).__name__
    return "torch.cuda.is_available() is False"


def cpus_available() -> int:
    """The CPUs this process may use: Slurm's --cpus-per-task, else its share of the affinity mask."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    return len(cpu_share())


def local_processes() -> int:
    """Processes of this job on this node: torchrun's LOCAL_WORLD_SIZE, else Slurm's tasks on this node."""
    env = os.environ
    if env.get("LOCAL_WORLD_SIZE", "").isdigit():
        return max(1, int(env["LOCAL_WORLD_SIZE"]))
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return max(1, int(env["SLURM_NTASKS_PER_NODE"]))
    per_node = _expand_slurm_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
    node = int(env.get("SLURM_NODEID", "0") or 0)
    return per_node[node] if node < len(per_node) else 1


def _expand_slurm_counts(text: str) -> list[int]:
    """Slurm's compressed per-node counts: "2(x3),1" → [2, 2, 2, 1]."""
    counts = []
    for part in filter(None, text.split(",")):
        count, _, repeat = part.partition("(x")
        if not count.isdigit():
            return []
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


_applied_share: tuple[int, list[int]] | None = None  # (pid, CPUs) once use_cpu_share has narrowed the mask


def cpu_share() -> list[int]:
    """The CPUs this process should use: its affinity mask, or, when the job's processes on this node all
    have the same mask (torchrun's ranks; Slurm tasks that are not bound to CPUs of their own), this
    process's slice of it by local rank, so that they do not all run on every core."""
    try:
        mask = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))
    if _applied_share == (os.getpid(), mask):  # use_cpu_share narrowed this process already
        return mask
    local = local_processes()
    shared = "LOCAL_WORLD_SIZE" in os.environ or len(mask) == (os.cpu_count() or len(mask))
    if local <= 1 or not shared:
        return mask
    per = max(1, len(mask) // local)
    start = (local_rank() % local) * per % len(mask)
    return mask[start:start + per]


def use_cpu_share() -> list[int]:
    """Keep this process (its decoder workers and threads, and DALI's, which DALI would otherwise pin to
    the GPU's NVML CPU set, the same for every rank) to its share of the CPUs; returns them."""
    global _applied_share
    share = cpu_share()
    try:
        if sorted(os.sched_getaffinity(0)) != share:
            os.sched_setaffinity(0, share)
            _applied_share = (os.getpid(), share)
            import torch

            torch.set_num_threads(len(share))
            log.info("local rank %d of %d: CPUs %s", local_rank(), local_processes(), _ranges(share))
    except AttributeError:  # not Linux
        return share
    os.environ.setdefault("DALI_AFFINITY_MASK", ",".join(map(str, share)))
    return share


def _ranges(cpus: list[int]) -> str:
    spans, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            spans.append(f"{start}" if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(spans)


def launcher_dist(dist, launched_by_slurm_launcher: bool):
    """Hydra's Slurm launcher submits a sweep as one array whose tasks are separate runs, not ranks of
    one: each run's ranks are its srun tasks."""
    if not launched_by_slurm_launcher or dist.rank is not None or dist.world_size is not None:
        return dist
    env = os.environ
    return type(dist)(rank=int(env.get("SLURM_PROCID", 0)), world_size=int(env.get("SLURM_NTASKS", 1)))


def in_slurm_launcher_job() -> bool:
    """A job submitted by Hydra's Slurm launcher (conf/hydra/launcher/slurm.yaml)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def requeue_with_launcher() -> None:
    """Hand a run that stopped on USR1 to the launcher's own preemption handler (slurm.yaml makes USR1
    its signal): it resubmits the same run, requeues the job and exits; the requeued run resumes."""
    handler = signal.getsignal(signal.SIGUSR1)
    if not callable(handler):
        raise RuntimeError("stopped by USR1, but the launcher does not handle USR1: "
                           "use hydra/launcher=slurm (it sets SUBMITIT_PREEMPT_SIGNAL=USR1)")
    log.warning("stopped by USR1: requeueing this run through the launcher")
    handler(signal.SIGUSR1, None)
