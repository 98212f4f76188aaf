"""Reliability (issue #13): atomic checkpoints under real kills, exact resume, no hung DDP.

The slow tests run ``tests/_train_with_faults.py`` (= ``tools/train_net.py`` plus test-only
fault injection) in subprocesses on a tiny generated dataset, and compare per-iteration raw
losses. See docs/reliability.md for what is guaranteed.
"""
import errno
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

import cpm_d2  # noqa: F401  (compat fixes before detectron2)
from cpm_d2.checkpoint import AVSCheckpointer, CheckpointWriteError
from cpm_d2.checkpoint.atomic import remove_stale_temp_files
from cpm_d2.data.datasets.synthetic import generate_synthetic_avs
from cpm_d2.engine.resume import (
    ResumableTrainLoader,
    TrainBatchStream,
    get_rng_state,
    isolated_rng,
    set_rng_state,
)

REPO = Path(__file__).resolve().parents[2]
FAULTS = str(REPO / "tests" / "_train_with_faults.py")
TINY_CPM = str(REPO / "configs" / "synthetic" / "cpm_r18_tiny.yaml")
_TEMP_RE = re.compile(r"^\..+\.tmp-")


# ============================================================================== atomic saves
def _tiny_checkpointer(folder):
    model = torch.nn.Linear(3, 2)
    return model, AVSCheckpointer(model, save_dir=str(folder))


def _temp_files(folder):
    return sorted(n for n in os.listdir(folder) if _TEMP_RE.match(n))


def test_atomic_save_writes_checkpoint_then_tag(tmp_path):
    model, ckpt = _tiny_checkpointer(tmp_path)
    ckpt.save("model_a", iteration=3)
    assert (tmp_path / "last_checkpoint").read_text() == "model_a.pth"
    data = torch.load(tmp_path / "model_a.pth", map_location="cpu", weights_only=True)
    assert data["iteration"] == 3 and torch.equal(data["model"]["weight"], model.weight.detach())
    assert _temp_files(tmp_path) == []
    # the final file gets the usual permissions, not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model_a.pth").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_previous_checkpoint_and_tag(tmp_path, monkeypatch):
    model, ckpt = _tiny_checkpointer(tmp_path)
    ckpt.save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *a, **k):
        f.write(b"\x80partial")
        raise OSError("disk full (simulated)")

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save("model_final")  # overwriting a name in place was the unsafe case
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert _temp_files(tmp_path) == []


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    from cpm_d2.checkpoint.atomic import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model_0000001.pth.tmp-{_HOST}-{dead.pid}-abc123"
    live = tmp_path / f".model_0000002.pth.tmp-{_HOST}-{os.getppid()}-xyz789"
    other_host = tmp_path / f".model_0000003.pth.tmp-otherhost-{dead.pid}-abc"
    for p in (stale, live, other_host):
        p.write_bytes(b"partial")
    _, ckpt = _tiny_checkpointer(tmp_path)
    ckpt.save("model_0000004")
    assert not stale.exists() and live.exists() and other_host.exists()
    assert remove_stale_temp_files(str(tmp_path)) == []


def test_tag_refuses_a_missing_checkpoint(tmp_path):
    _, ckpt = _tiny_checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        ckpt.tag_last_checkpoint("model_9999999.pth")
    assert not (tmp_path / "last_checkpoint").exists()


def test_failed_write_names_the_file_and_the_os_error(tmp_path, monkeypatch):
    """Disk full (as torch reports it: its RuntimeError over the ENOSPC), read-only or unwritable folder."""
    model, ckpt = _tiny_checkpointer(tmp_path)
    ckpt.save("model_0000001")
    before = (tmp_path / "model_0000001.pth").read_bytes()
    real_mkstemp, real_save = tempfile.mkstemp, torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    def refuse(code):
        def mkstemp(*args, **kwargs):
            raise OSError(code, os.strerror(code), kwargs.get("dir"))
        return mkstemp

    for code, target, fake in ((errno.ENOSPC, torch, disk_full), (errno.EROFS, tempfile, refuse(errno.EROFS)),
                               (errno.EACCES, tempfile, refuse(errno.EACCES))):
        name = "save" if target is torch else "mkstemp"
        monkeypatch.setattr(target, name, fake)
        with pytest.raises(CheckpointWriteError) as info:
            ckpt.save("model_0000002")
        monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
        monkeypatch.setattr(torch, "save", real_save)
        code_name = errno.errorcode[code]
        assert str(info.value) == (
            f"cannot write checkpoint {tmp_path / 'model_0000002.pth'}: {code_name} ({os.strerror(code)}); the "
            f"previous checkpoint stays valid (last_checkpoint -> {tmp_path / 'model_0000001.pth'})"), code_name
        assert info.value.errno == code
        assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
        assert (tmp_path / "model_0000001.pth").read_bytes() == before
        assert not (tmp_path / "model_0000002.pth").exists() and _temp_files(tmp_path) == []


def test_hooks_ending_after_a_failure_do_not_replace_its_error(logged):
    """A writer flushing to the same read-only disk used to raise last (TensorBoard's EROFS), hiding the cause."""
    from types import SimpleNamespace

    from cpm_d2.engine import Trainer

    class Hook:
        def __init__(self, error=None):
            self.error, self.ended = error, False

        def after_train(self):
            self.ended = True
            if self.error:
                raise self.error

    def trainer(iteration):  # the state detectron2's train() leaves for after_train, nothing else
        t = Trainer.__new__(Trainer)
        t.iter, t.max_iter, t.storage = iteration, 10, SimpleNamespace(iter=0)
        t._hooks = [Hook(OSError(errno.EROFS, "Read-only file system")), Hook()]
        return t

    warnings = logged("cpm_d2.engine.trainer")
    failed = trainer(3)
    failed.after_train()  # called in detectron2's `finally`: must not raise over the training's error
    assert all(h.ended for h in failed._hooks) and failed.storage.iter == 3
    assert "after the training error, Hook failed to end too: OSError" in warnings[-1]
    with pytest.raises(OSError):  # a run that finished: a hook's error is the error
        trainer(10).after_train()


# ============================================================================== OUTPUT_DIR lock
_HOLD_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("output_lock", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with module.output_dir_lock(sys.argv[2]):
    print("held", flush=True)
    time.sleep(300)
"""


def _hold_lock(folder):
    """A live process holding ``folder``'s lock (the module alone: no detectron2 import)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(REPO / "cpm_d2" / "engine" / "output_lock.py"),
                             str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_output_dir_lock_refuses_a_live_job_and_takes_over_a_dead_ones(tmp_path, logged):
    from cpm_d2.engine import OutputDirLocked, output_dir_lock

    warnings = logged("cpm_d2.engine.output_lock")
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(OutputDirLocked, match=rf"in use by another training job: pid {holder.pid} on host "
                                                  rf"{re.escape(socket.gethostname())}, started .*train\.lock"):
            with output_dir_lock(str(tmp_path)):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == holder.pid  # left behind by the kill
    with output_dir_lock(str(tmp_path)) as path:
        assert json.loads(Path(path).read_text())["pid"] == os.getpid()
        assert f"was left by pid {holder.pid} on host" in warnings[-1] and "taken over" in warnings[-1]
    assert not (tmp_path / "train.lock").exists(), "released at exit"


def test_output_dir_lock_of_another_host_is_refused(tmp_path):
    from cpm_d2.engine import OutputDirLocked, output_dir_lock

    (tmp_path / "train.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(OutputDirLocked, match=r"locked by pid 1 on host elsewhere.*cannot tell.*delete the lock file"):
        with output_dir_lock(str(tmp_path)):
            pass
    assert (tmp_path / "train.lock").exists()


# ============================================================================== resumable data order
def _toy_dataset(n=7):
    return [{"idx": i, "width": 64 if i % 3 else 40, "height": 48} for i in range(n)]


def _toy_mapper(d):
    # draws from every global stream the real mapper may use
    return (d["idx"], float(np.random.rand()), random.random(), float(torch.rand(())), torch.initial_seed())


def test_stream_order_is_detectron2_training_sampler():
    from detectron2.data.samplers import TrainingSampler

    for world in (1, 2):
        for rank in range(world):
            sampler = TrainingSampler(7, shuffle=True, seed=5)
            sampler._rank, sampler._world_size = rank, world
            expected = list(islice(iter(sampler), 3 * 10))
            stream = TrainBatchStream(_toy_dataset(), lambda d: d, batch_size=3, seed=5, rank=rank, world_size=world)
            got = [i for batch in islice(stream.batch_indices(), 10) for i in batch]
            assert got == expected


@pytest.mark.parametrize("grouping", [False, True])
def test_stream_restarts_at_any_batch_with_any_worker_count(grouping):
    def stream(start):
        s = TrainBatchStream(_toy_dataset(), _toy_mapper, batch_size=2, seed=3, rank=1, world_size=2,
                             aspect_ratio_grouping=grouping)
        s.start_batch = start
        return s

    full = list(islice(ResumableTrainLoader(stream(0), num_workers=0), 9))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert list(islice(ResumableTrainLoader(stream(0), num_workers=0), 9)) == full
    assert torch.equal(torch.get_rng_state(), before), "mapping must not move the training random stream"
    resumed = list(islice(ResumableTrainLoader(stream(4), num_workers=2), 5))
    assert resumed == full[4:]
    if grouping:
        widths = {d["idx"]: d["width"] for d in _toy_dataset()}
        assert all(len({widths[item[0]] > 48 for item in batch}) == 1 for batch in full)


def test_start_batch_is_read_at_first_next_not_at_iter():
    loader = ResumableTrainLoader(TrainBatchStream(_toy_dataset(), _toy_mapper, batch_size=2, seed=3))
    it = iter(loader)  # detectron2 0.6's SimpleTrainer does this in its constructor
    loader.start_batch = 2
    first = next(it)
    loader2 = ResumableTrainLoader(TrainBatchStream(_toy_dataset(), _toy_mapper, batch_size=2, seed=3))
    assert first == list(islice(loader2, 3))[2]


def test_mapper_returning_none_is_an_error():
    d = _toy_dataset(3)
    d[0]["file_name"] = "/data/clip/0.jpg"
    s = TrainBatchStream(d, lambda x: None, batch_size=1, seed=0, shuffle=False)
    with pytest.raises(RuntimeError, match=r"/data/clip/0\.jpg"):
        next(iter(s))


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = get_rng_state(plain=True)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.save({"rng_states": [state]}, tmp_path / "s.pth")
    loaded = torch.load(tmp_path / "s.pth", weights_only=True)["rng_states"][0]
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_state(loaded)
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    with isolated_rng(seed=9):
        a = torch.rand(2)
    with isolated_rng(seed=9):
        b = torch.rand(2)
    assert torch.equal(a, b)
    outside = torch.get_rng_state()
    with isolated_rng(seed=9):
        torch.rand(100)
    assert torch.equal(torch.get_rng_state(), outside)


# ============================================================================== subprocess runs
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_avs") / "tiny"
    generate_synthetic_avs(
        root, seed=11, clips_per_split={"train": 4, "val": 2}, frames_per_clip=3, image_size=(48, 64)
    )
    return str(root)


def _cmd(tiny_root, out, *extra, num_gpus=1, max_iter=8, period=3, eval_period=0, workers=0, sgd=False):
    # --dist-url auto: a free port (detectron2's default port is fixed per user: concurrent jobs collide)
    cmd = [sys.executable, FAULTS, "--config-file", TINY_CPM, "--num-gpus", str(num_gpus), "--dist-url", "auto",
           "--register-dataset", "rel_train", tiny_root, "train", "--register-dataset", "rel_val", tiny_root, "val",
           *extra,
           "DATASETS.TRAIN", "('rel_train',)", "DATASETS.TEST", "('rel_val',)" if eval_period else "()",
           "INPUT.FIXED_SIZE", "(48, 64)", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(max_iter),
           "SOLVER.CHECKPOINT_PERIOD", str(period), "TEST.EVAL_PERIOD", str(eval_period),
           "DATALOADER.NUM_WORKERS", str(workers), "SEED", "7", "OUTPUT_DIR", str(out)]
    if sgd:  # no optimizer moments: 3x smaller checkpoints for the many-save kill trials
        cmd += ["SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.0"]
    return cmd


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{k: str(v) for k, v in extra.items()})


def _run(cmd, env, expect_rc=0, timeout=300):
    """Run in its own session; on timeout kill the whole group (a hung job's workers too) and re-raise."""
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                             start_new_session=True)
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.communicate()
        raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def _records(path, complete_only=False):
    """One dict per JSON line of `path` ([] when it does not exist); ``complete_only``: leave out a last
    line not yet ended by its newline (read while a writer may be in the middle of it)."""
    if not Path(path).exists():
        return []
    lines = Path(path).read_text().split("\n")
    if complete_only:
        lines = lines[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def _losses(records):
    """{iteration: [loss dict, ...]} over every time an iteration was run."""
    out = {}
    for r in records:
        if "iter" in r:
            out.setdefault(r["iter"], []).append(r["losses"])
    return out


def _assert_same_losses(reference, runs, tol=1e-6):
    checked = 0
    for it, seen in runs.items():
        ref = reference[it][0]
        for losses in seen:
            assert set(losses) == set(ref), it
            for k, v in losses.items():
                assert abs(v - ref[k]) <= tol, f"iteration {it} {k}: {v} vs uninterrupted {ref[k]}"
            checked += 1
    return checked


@pytest.mark.slow
def test_exact_resume_repeats_the_uninterrupted_losses(tiny_root, tmp_path):
    """Interrupted after iteration 6 (checkpoint of iteration 5), resumed with 2 loader workers."""
    ref_log, log = tmp_path / "ref.jsonl", tmp_path / "run.jsonl"
    # evaluation every 4 iterations: it must not shift the training's random draws either
    _run(_cmd(tiny_root, tmp_path / "ref", eval_period=4), _env(CPM_TEST_LOSS_LOG=ref_log))
    out = tmp_path / "run"
    _run(_cmd(tiny_root, out, eval_period=4), _env(CPM_TEST_LOSS_LOG=log, CPM_TEST_EXIT_AFTER=6), expect_rc=17)
    assert (out / "last_checkpoint").read_text() == "model_0000005.pth"
    _run(_cmd(tiny_root, out, "--resume", eval_period=4, workers=2), _env(CPM_TEST_LOSS_LOG=log))
    records = _records(log)
    assert [r["start_iter"] for r in records if "start_iter" in r] == [0, 6]
    reference, runs = _losses(_records(ref_log)), _losses(records)
    assert sorted(runs) == list(range(8)) and len(runs[6]) == 2  # iteration 6 ran twice
    assert _assert_same_losses(reference, runs) == 9
    saved = torch.load(out / "model_0000005.pth", map_location="cpu", weights_only=True)
    assert len(saved["trainer"]["rng_states"]) == 1 and saved["trainer"]["data"]["next_batch"] == 6


def _prune(out):
    """Keep only the checkpoint last_checkpoint names (the kill trials save every iteration)."""
    keep = (out / "last_checkpoint").read_text().strip() if (out / "last_checkpoint").exists() else None
    for p in out.glob("*.pth"):
        if p.name != keep:
            p.unlink()


def _check_last_checkpoint(out):
    """After a kill: last_checkpoint is absent or names a complete checkpoint. Returns its iteration (or -1)."""
    marker = out / "last_checkpoint"
    if not marker.exists():
        assert not list(out.glob("*.pth")), "a checkpoint was renamed into place but never tagged... and none before"
        return -1
    name = marker.read_text().strip()
    assert re.fullmatch(r"model_\d{7}\.pth|model_final\.pth", name), f"last_checkpoint holds {name!r}"
    data = torch.load(out / name, map_location="cpu", weights_only=True)  # complete and loadable
    it = data["trainer"]["iteration"]
    if name != "model_final.pth":
        assert it == int(name[6:13])
    assert data["model"] and data["trainer"]["rng_states"] and data["trainer"]["data"]["next_batch"] == it + 1
    return it


def _kill_plan(rng, *, in_save, random_kills, max_iter):
    """The trials, drawn up front: ("in_save", stage, n) kills inside the run's n-th save (n in 1, 2);
    ("random", None, delay) kills `delay` seconds after the run's first iteration record, or at its
    second, whichever comes first. A trial so completes at most 2 iterations, so the plan is checked
    to leave the last run at least 2 of max_iter: otherwise a fast machine could finish the training
    before the last kill (the number of kills would then depend on the machine's speed)."""
    trials = [("in_save", stage) for stage in in_save] + [("random", None)] * random_kills
    rng.shuffle(trials)
    plan = [(kind, stage, rng.randint(1, 2) if kind == "in_save" else rng.uniform(0.0, 1.5))
            for kind, stage in trials]
    most = sum(n if kind == "in_save" else 2 for kind, _, n in plan)
    assert most <= max_iter - 2, f"the plan may complete {most} of {max_iter} iterations: raise max_iter"
    return plan


def _kill_at_random_point(proc, log, lines_before, delay):
    """SIGKILL the process group of `proc` `delay` s after its first new iteration record in `log`, or
    as soon as a second one appears (the record comes before its iteration's checkpoint)."""
    deadline = time.time() + 240

    def new_iterations():
        return sum("iter" in r for r in _records(log, complete_only=True)[lines_before:])

    while proc.poll() is None and time.time() < deadline and new_iterations() < 1:
        time.sleep(0.01)
    kill_at = time.time() + delay
    while proc.poll() is None and time.time() < kill_at and new_iterations() < 2:
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def _kill_chain(tiny_root, tmp_path, *, num_gpus, in_save, random_kills, max_iter, seed):
    """Trials: a `--resume` run killed (SIGKILL) inside a save or at a random point, checked, resumed.
    Returns the number of runs killed (every trial's, unless a run finished first)."""
    plan = _kill_plan(random.Random(seed), in_save=in_save, random_kills=random_kills, max_iter=max_iter)
    out, log, ref_log = tmp_path / "chain", tmp_path / "chain.jsonl", tmp_path / "ref.jsonl"
    common = dict(num_gpus=num_gpus, max_iter=max_iter, sgd=True)
    _run(_cmd(tiny_root, tmp_path / "ref", period=1000, **common), _env(CPM_TEST_LOSS_LOG=ref_log))
    last_it, killed, hit_save = -1, 0, 0
    for kind, stage, when in plan:
        env = _env(CPM_TEST_LOSS_LOG=log)
        if kind == "in_save":
            env["CPM_TEST_KILL_IN_SAVE"] = f"{when}:{stage}"
        lines_before = len(_records(log))
        proc = subprocess.Popen(_cmd(tiny_root, out, "--resume", period=1, **common), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            if kind == "random":
                _kill_at_random_point(proc, log, lines_before, when)
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        err = proc.stderr.read()
        if proc.returncode == 0:  # finished before the kill: nothing left to interrupt
            break
        killed += 1
        if kind == "in_save" and num_gpus == 1:
            assert proc.returncode == -signal.SIGKILL, err[-3000:]
        hit_save += bool(_temp_files(out)) or kind == "in_save"
        new = _records(log)[lines_before:]
        starts = [r["start_iter"] for r in new if "start_iter" in r]
        assert starts in ([], [last_it + 1]), f"resumed at {starts}, last complete checkpoint was {last_it}"
        last_it = _check_last_checkpoint(out)
        _prune(out)
    final = _run(_cmd(tiny_root, out, "--resume", period=1, **common), _env(CPM_TEST_LOSS_LOG=log))
    starts = [r["start_iter"] for r in _records(log) if "start_iter" in r]
    assert starts[-1] == last_it + 1, final.stderr[-2000:]
    assert torch.load(out / "model_final.pth", weights_only=True)["trainer"]["iteration"] == max_iter - 1
    reference, runs = _losses(_records(ref_log)), _losses(_records(log))
    assert sorted(runs) == list(range(max_iter))
    # every time any iteration ran, in any interrupted or resumed process, it gave the uninterrupted losses
    checked = _assert_same_losses(reference, runs)
    print(f"{killed} kills ({hit_save} inside a save), {checked} iteration results compared, last start {starts[-1]}")
    return killed


IN_SAVE_STAGES = ("write", "before_rename", "after_rename", "tag_before_rename", "tag_after_rename")


@pytest.mark.slow
def test_kill_trials_single_process_resume_from_complete_checkpoint(tiny_root, tmp_path):
    killed = _kill_chain(tiny_root, tmp_path, num_gpus=1, in_save=IN_SAVE_STAGES * 2, random_kills=5,
                         max_iter=30, seed=1)
    assert killed == 15


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_trials_two_processes_resume_from_complete_checkpoint(tiny_root, tmp_path):
    killed = _kill_chain(tiny_root, tmp_path, num_gpus=2, in_save=("write", "tag_before_rename"),
                         random_kills=3, max_iter=14, seed=2)
    assert killed == 5


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_rank_failure_ends_the_job_with_its_error(tiny_root, tmp_path):
    """2 gloo processes, rank 1 raises before iteration 3: the job exits 1 within seconds, error last."""
    out = tmp_path / "run"
    cmd = _cmd(tiny_root, out, num_gpus=2, max_iter=8, period=1000)
    started = time.time()
    try:
        proc = _run(cmd, _env(CPM_TEST_FAIL="1:3"), expect_rc=None, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the job hung after rank 1 raised (killed after 120 s)")
    ended = time.time()
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed_at = float(re.search(r"injected failure on rank 1 at iteration 3 \(t=([\d.]+)\)", proc.stderr).group(1))
    assert started < failed_at < ended
    assert ended - failed_at < 30, f"took {ended - failed_at:.1f} s from the error to the exit"
    tail = proc.stderr.strip().splitlines()[-1]
    assert tail.startswith("RuntimeError: injected failure on rank 1 at iteration 3"), proc.stderr[-3000:]
    assert "rank 1 of 2 raised" in proc.stderr
    log = (out / "log.txt").read_text().strip().splitlines()
    assert log[-1].startswith("RuntimeError: injected failure on rank 1 at iteration 3"), log[-5:]


@pytest.mark.slow
def test_checkpoint_write_failure_ends_with_one_line_naming_it(tiny_root, tmp_path):
    """Disk full in the 3rd save: torch's 'unexpected pos' used to be the last line, the ENOSPC far above it."""
    out = tmp_path / "run"
    proc = _run(_cmd(tiny_root, out, max_iter=4, period=1, sgd=True), _env(CPM_TEST_SAVE_ERROR="3:ENOSPC"),
                expect_rc=1)
    expected = (f"[train_net] ERROR: cannot write checkpoint {out}/model_0000002.pth: ENOSPC (No space left on "
                f"device); the previous checkpoint stays valid (last_checkpoint -> {out}/model_0000001.pth)")
    assert proc.stderr.strip().splitlines()[-1] == expected, proc.stderr[-3000:]
    assert (out / "log.txt").read_text().strip().splitlines()[-1] == expected
    assert _check_last_checkpoint(out) == 1 and _temp_files(out) == []
    assert not (out / "train.lock").exists()


@pytest.mark.slow
def test_one_job_per_output_dir_weights_floor_and_loading_summaries(tiny_root, tmp_path):
    """A tiny training end to end: a live job's OUTPUT_DIR is refused at once; a dead job's lock is taken
    over; a torchvision state dict as MODEL.WEIGHTS (nothing matches) is refused unless
    --allow-partial-weights; log.txt holds the loading summary of the train and the test dataset."""
    import torchvision

    out = tmp_path / "run"
    weights = tmp_path / "resnet18-torchvision.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cmd = _cmd(tiny_root, out, max_iter=2, eval_period=2, period=1000) + ["MODEL.WEIGHTS", str(weights)]
    holder = _hold_lock(out)
    try:
        started = time.time()
        proc = _run(cmd, _env(), expect_rc=1)
        assert time.time() - started < 60
        assert re.search(rf"OutputDirLocked: OUTPUT_DIR {re.escape(str(out))} is in use by another training job: "
                         rf"pid {holder.pid} on host", proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]
        assert "Starting training" not in proc.stdout + proc.stderr and not (out / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()

    proc = _run(cmd, _env(), expect_rc=1)  # the dead holder's lock is taken over; the weights are refused
    log = proc.stdout + proc.stderr
    assert f"was left by pid {holder.pid} on host" in log and "taken over" in log
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cpm_d2.checkpoint.loading.CheckpointMismatchError: MODEL.WEIGHTS {weights}"), last
    assert "matches 0 of the model's" in last and "tools/convert_pretrained.py" in last
    assert "--allow-partial-weights" in last and "Starting training" not in log
    assert not (out / "train.lock").exists(), "released when the job ended"

    cmd.insert(cmd.index("--register-dataset"), "--allow-partial-weights")
    _run(cmd, _env())
    text = (out / "log.txt").read_text()
    assert "Partial load from" in text and f"was left by pid {holder.pid}" in text
    for name, split, counts in (("rel_train", "train", "4 clips, 12 frames, 12 labelled frames"),
                                ("rel_val", "val", "2 clips, 6 frames, 6 labelled frames")):
        assert (f"dataset '{name}': split '{split}' of AVSS layout at {tiny_root}: {counts} (= records); "
                "nothing skipped") in text, name
    assert not (out / "train.lock").exists()
