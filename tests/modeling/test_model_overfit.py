"""The tiny class-agnostic model memorises 4 synthetic frames in 50 AdamW steps."""
import pytest
import torch

import cpm_d2  # noqa: F401
import cpm_d2.modeling  # noqa: F401
from cpm_d2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Instances

torch.set_num_threads(2)
H, W, C = 61, 83, 3


def _frame(i):
    """A red rectangle (class 1) and a green disk (class 2) on a dark noisy background; audio is noise."""
    g = torch.Generator().manual_seed(i)
    sem = torch.zeros(H, W, dtype=torch.long)
    img = 40 + 20 * torch.rand(3, H, W, generator=g)
    y0, x0 = 5 + 8 * i, 6 + 10 * i
    sem[y0:y0 + 18, x0:x0 + 24] = 1
    img[:, y0:y0 + 18, x0:x0 + 24] = torch.tensor([220.0, 40, 40])[:, None, None]
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    disk = (yy - (45 - 3 * i)) ** 2 + (xx - (65 - 8 * i)) ** 2 <= 100
    sem[disk] = 2
    img[:, disk] = torch.tensor([40.0, 200, 60])[:, None]
    classes = sem.unique().tolist()
    inst = Instances((H, W))
    inst.gt_classes = torch.tensor(classes)
    inst.gt_masks = torch.stack([sem == c for c in classes])
    return {"file_name": f"synthetic_{i}.png", "image": img.to(torch.uint8), "sem_seg": sem, "instances": inst,
            "audio": torch.rand(1, 32, 24, generator=g), "height": H, "width": W}


def _miou(outputs, frames):
    ious = []
    for out, fr in zip(outputs, frames):
        pred = out["sem_seg"].argmax(0)
        for c in range(C):
            inter = ((pred == c) & (fr["sem_seg"] == c)).sum().item()
            union = ((pred == c) | (fr["sem_seg"] == c)).sum().item()
            ious.append(inter / union)
    return sum(ious) / len(ious)


@pytest.mark.slow
def test_overfit_four_frames():
    cfg = get_cfg()
    cfg.merge_from_file("configs/synthetic/baseline_r18_tiny.yaml")
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = C
    torch.manual_seed(0)
    model = build_model(cfg)
    frames = [_frame(i) for i in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    history = []
    for _ in range(50):
        loss = sum(model(frames).values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
    assert history[0] / (sum(history[-5:]) / 5) > 5.0, history
    model.eval()
    with torch.no_grad():
        miou = _miou(model(frames), frames)
    assert miou > 0.9, miou
