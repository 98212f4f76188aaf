"""Cost of the GMM class head's two training-time operations, measured in isolation.

EM (``update``) runs once every MODEL.MASK_FORMER.GMM.UPDATE_INTERVAL iterations, so a short profiled
window may hold no EM call, or one whose cost depends on where the window starts. These helpers
time single calls directly (wall clock around the public methods, nothing patched): EM on a
*copy* of a trained predictor (the model is left as it was), and sampling 16 prompts.
"""
import copy
import statistics
import time

import torch

from .models import sync_fn

__all__ = ["em_call_cost", "standalone_gmm"]


def em_call_cost(class_predictor, device="cpu", calls=5):
    """Median ms of one EM update and of sampling 16 prompts on a copy of ``class_predictor``;
    None for a class head without EM (the linear head)."""
    if getattr(class_predictor, "mixtures", None) is None:
        return None
    sync = sync_fn(device)
    gmm = copy.deepcopy(class_predictor.mixtures)
    labels = torch.arange(16, device=gmm.means.device) % (gmm.num_mixtures - 2) + 1
    em, smp = [], []
    ran = True
    for i in range(calls):
        sync()
        t0 = time.perf_counter()
        ran = gmm.update(1000 + i) and ran
        sync()
        em.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gmm.sample(labels)
        sync()
        smp.append(time.perf_counter() - t0)
    return {
        "em_call_ms": 1e3 * statistics.median(em),
        "sample16_ms": 1e3 * statistics.median(smp),
        "em_ran": bool(ran),
        "update_interval": int(gmm.update_interval),
        "classes_with_samples": int((gmm.distinct_entries() >= gmm.min_entries).sum()),
        "shape": {"C+1": gmm.num_mixtures, "M": gmm.num_components, "D": gmm.embed_dim, "S": gmm.memory_size},
    }


def standalone_gmm(num_classes, device="cpu", m=3, d=256, s=512, calls=3, seed=0):
    """EM + sample cost of a fresh GMMClassPredictor whose banks are full (random embeddings, one
    cluster per class), after the first (k-means++ seeded) update."""
    from cpm_d2.modeling.class_predictor.gmm import GMMClassPredictor

    gmm = GMMClassPredictor(num_classes=num_classes, embed_dim=d, num_components=m, memory_size=s,
                            update_interval=1).to(device)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes + 1).repeat_interleave(s)
    emb = torch.randn(labels.numel(), d, generator=g) + labels[:, None].float()
    gmm.observe(emb.to(device), labels.to(device))
    gmm.update(0)
    res = em_call_cost(gmm, device, calls=calls)
    res["num_classes"] = num_classes
    return res
