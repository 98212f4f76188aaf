"""Foundation: the package imports cleanly, registers once, and compat fixes only what needs it."""
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

import cpm_d2
from cpm_d2 import compat

REPO = Path(__file__).resolve().parents[1]


def test_import_twice_registers_nothing_twice():
    # A second import (and a reload of the registering modules) must not raise
    # detectron2's "An object named ... was already registered".
    importlib.import_module("cpm_d2")
    code = "import cpm_d2, importlib; importlib.import_module('cpm_d2'); import cpm_d2; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_pillow_patch_is_noop_when_linear_exists():
    fake = types.SimpleNamespace(LINEAR=2, BILINEAR=2)
    assert compat.patch_pillow(fake) is False
    assert fake.LINEAR == 2


def test_pillow_patch_adds_alias_when_missing():
    fake = types.SimpleNamespace(BILINEAR=2)
    assert compat.patch_pillow(fake) is True
    assert fake.LINEAR == fake.BILINEAR


def test_missing_C_stub_installed_only_when_needed(monkeypatch):
    # A fake package whose "_C" submodule cannot be imported gets the stand-in ...
    pkg = types.ModuleType("fake_d2_no_ops")
    pkg.__path__ = []
    monkeypatch.setitem(sys.modules, "fake_d2_no_ops", pkg)
    assert compat.patch_missing_detectron2_C(pkg) is True
    with pytest.raises(compat.MissingCompiledOp, match="deform_conv_forward"):
        pkg._C.deform_conv_forward
    # ... and a second call changes nothing.
    stub = sys.modules["fake_d2_no_ops._C"]
    assert compat.patch_missing_detectron2_C(pkg) is False
    assert sys.modules["fake_d2_no_ops._C"] is stub
    monkeypatch.delitem(sys.modules, "fake_d2_no_ops._C")


def test_missing_C_stub_not_installed_when_real_module_exists(monkeypatch):
    pkg = types.ModuleType("fake_d2_with_ops")
    pkg.__path__ = []
    real = types.ModuleType("fake_d2_with_ops._C")
    monkeypatch.setitem(sys.modules, "fake_d2_with_ops", pkg)
    monkeypatch.setitem(sys.modules, "fake_d2_with_ops._C", real)
    assert compat.patch_missing_detectron2_C(pkg) is False
    assert sys.modules["fake_d2_with_ops._C"] is real


def test_detectron2_modules_we_use_import():
    from detectron2.data import transforms  # noqa: F401  (uses Image.LINEAR on 0.6)
    from detectron2.engine import DefaultTrainer  # noqa: F401
    import detectron2.layers  # noqa: F401  (imports _C on 0.6)
    from detectron2.projects.point_rend.point_features import point_sample  # noqa: F401


def _allreduce_worker(value_file):
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    t = torch.tensor([float(comm.get_rank() + 1)])
    dist.all_reduce(t)
    if comm.is_main_process():
        Path(value_file).write_text(f"{t.item()} {comm.get_world_size()} {comm.get_local_size()}")


@pytest.mark.distributed
def test_cpu_launch_two_processes(tmp_path):
    out = tmp_path / "value.txt"
    compat.launch(_allreduce_worker, 2, dist_url="auto", args=(str(out),))
    assert out.read_text() == "3.0 2 2"


def test_train_net_help():
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_net.py"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "--config-file" in out.stdout and "--eval-only" in out.stdout


def test_add_cpm_config_keys():
    from cpm_d2.config import get_cfg

    cfg = get_cfg()
    assert cfg.MODEL.MASK_FORMER.GMM.NUM_COMPONENTS == 3
    assert cfg.INPUT.AUDIO.N_FFT == 512 and cfg.INPUT.AUDIO.HOP_LENGTH == 160
