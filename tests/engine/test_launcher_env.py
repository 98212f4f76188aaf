"""Which launcher started a process (torchrun, SLURM, detectron2's flags), and mixed settings refused.

The end-to-end runs (torchrun with 2 processes, 2 machines on localhost, 2 SLURM tasks) are in
tests/engine/test_training.py; these check the environment rules without starting processes.
"""
import argparse

import pytest

import cpm_d2  # noqa: F401
from cpm_d2.engine.launcher import LaunchError, check_flags, detect_launch, expand_nodelist


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu5", ["gpu5"]),
    ("a[1-2],b,c[09-10]", ["a1", "a2", "b", "c09", "c10"]),
    ("rack[1-2]-n[3-4]", ["rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"]),
    ("127.0.0.[1-3]", ["127.0.0.1", "127.0.0.2", "127.0.0.3"]),
])
def test_slurm_node_lists_expand_in_order(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node]1[", "node[3-1]", "node[a-b]", ""])
def test_malformed_node_lists_are_named(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


def _slurm(rank, **extra):
    env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "4", "SLURM_LOCALID": str(rank % 2),
           "SLURM_NODEID": str(rank // 2), "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    env.update(extra)
    return env


def test_slurm_tasks_become_ranks_of_one_job():
    launch = detect_launch(_slurm(3))
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("SLURM", 3, 4, 1)
    assert launch.master_addr == "gpu07"  # the first host of the job's node list
    assert launch.master_port == 15000 + 123456 % 50000  # from the job id: the same in every task
    assert launch.environ() == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "GROUP_RANK": "1",
                                "MASTER_ADDR": "gpu07", "MASTER_PORT": str(15000 + 123456 % 50000)}
    # an srun step smaller than the allocation, and explicit MASTER_ADDR / MASTER_PORT
    launch = detect_launch(_slurm(1, SLURM_STEP_NUM_TASKS="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="29400"))
    assert (launch.world_size, launch.master_addr, launch.master_port) == (2, "10.0.0.1", 29400)


def test_a_single_slurm_task_or_no_launcher_is_not_an_external_job():
    assert detect_launch({}) is None
    assert detect_launch(_slurm(0, SLURM_NTASKS="1")) is None  # one task: --num-gpus N spawns as usual


def test_torchrun_variables_win_over_slurm_and_are_checked():
    env = dict(_slurm(0), RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1234",
               TORCHELASTIC_RUN_ID="x", GROUP_RANK="2")
    launch = detect_launch(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.node) == ("torchrun", 5, 8, "2")
    with pytest.raises(LaunchError, match=r"^WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are "
                                          r"not: start the job with torchrun"):
        detect_launch({"WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match=r"RANK=2 is not in 0 \.\. WORLD_SIZE-1 = 1"):
        detect_launch({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    # variables exported by hand in an srun task that disagree with SLURM's
    env.pop("TORCHELASTIC_RUN_ID")
    with pytest.raises(LaunchError, match=r"^WORLD_SIZE=8 disagrees with SLURM's SLURM_NTASKS=4: unset WORLD_SIZE"):
        detect_launch(env)


def test_slurm_without_what_it_needs_says_what_to_set():
    with pytest.raises(LaunchError, match="SLURM_LOCALID is not; start the tasks with srun"):
        detect_launch({k: v for k, v in _slurm(0).items() if k != "SLURM_LOCALID"})
    with pytest.raises(LaunchError, match="gives no port; set MASTER_PORT"):
        detect_launch({k: v for k, v in _slurm(0).items() if k != "SLURM_JOB_ID"})
    with pytest.raises(LaunchError, match="unbalanced.*set MASTER_ADDR"):
        detect_launch(_slurm(0, SLURM_JOB_NODELIST="gpu[07-08"))


def _args(**kw):
    base = dict(num_gpus=1, num_machines=1, machine_rank=0, dist_url="tcp://127.0.0.1:50152")
    base.update(kw)
    return argparse.Namespace(**base)


def test_launch_flags_inside_torchrun_or_srun_are_refused_with_what_to_run():
    torchrun = detect_launch({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                              "MASTER_PORT": "1"})
    check_flags(_args(), torchrun, "tcp://127.0.0.1:50152")  # no launch flag: fine
    with pytest.raises(LaunchError, match=r"^torchrun started this process as rank 0 of WORLD_SIZE=2, but --num-gpus 2 "
                                          r"would start another job inside it.*Run torchrun --nproc_per_node N"):
        check_flags(_args(num_gpus=2), torchrun, "tcp://127.0.0.1:50152")
    with pytest.raises(LaunchError, match=r"--dist-url tcp://10.0.0.1:1 would start"):
        check_flags(_args(dist_url="tcp://10.0.0.1:1"), torchrun, "tcp://127.0.0.1:50152")
    with pytest.raises(LaunchError, match=r"^SLURM started this process as rank 2 of WORLD_SIZE=4, but --num-machines 2, "
                                          r"--machine-rank 1 would .*Run srun --ntasks-per-node N"):
        check_flags(_args(num_machines=2, machine_rank=1), detect_launch(_slurm(2)))
    with pytest.raises(LaunchError, match=r"--machine-rank 2 must be in 0 \.\. --num-machines - 1 = 1"):
        check_flags(_args(num_machines=2, machine_rank=2), None)
