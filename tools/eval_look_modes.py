#!/usr/bin/env python
"""Do a class's query embeddings keep its looks apart, and do its mixture's components follow them?

    python tools/eval_look_modes.py configs/synthetic/cpm_r18_hard_multimodal.yaml output/x/model_final.pth
    python tools/eval_look_modes.py --dataset synthetic_avs_hard_multimodal_val --output looks.json CONFIG WEIGHTS

For a synthetic dataset whose classes have several looks (preset ``hard_multimodal``: the info file
records each object's ``"look"``), every query the Hungarian matcher assigns to a sounding object's
class is paired with that object's look (a clip shows one object per class that may sound), and
its final embedding is L2-normalised (the space the GMM head models). Per class with at least
``MIN_PER_LOOK`` embeddings of two or more looks:

* ``look_accuracy``: % of the embeddings whose nearest look centroid (each centroid computed
  without the embedding itself) is their own look; ``look_chance``: % of the class's commonest look.
* ``component_purity``: with per-class mixtures (the GMM head, or the softmax head's GMM prompts),
  % of the embeddings whose most likely component of their class's mixture is one whose
  commonest look is their own; ``component_chance``: the same with one component for all
  (the commonest look's share). ``components_used``: components holding any embedding.
* ``centroid_distance`` / ``within_distance``: mean distance between the looks' centroids, and
  of an embedding to its own look's centroid.

Summary: each averaged over the classes counted (``classes``), and ``pairs`` (embeddings). Default
split: the test split.
"""
import os

from cpm_d2.evaluation.synthetic_eval import (capture_decoder_outputs, load_model_and_info, match_queries,
                                              setup_from_cli, write_json)

DATASETS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "datasets"))
MIN_PER_LOOK = 5


def look_statistics(embeddings, looks, components=None):
    """One class: embeddings (N, D) unit vectors, looks (N,) int, components (N,) int or None ->
    dict of the module docstring's per-class numbers (percentages), or None when fewer than two
    looks have MIN_PER_LOOK embeddings (looks with fewer are left out)."""
    import torch

    keep_looks = [int(k) for k in torch.unique(looks) if int((looks == k).sum()) >= MIN_PER_LOOK]
    if len(keep_looks) < 2:
        return None
    keep = torch.isin(looks, torch.tensor(keep_looks))
    x, look = embeddings[keep].double(), looks[keep]
    index = torch.tensor([keep_looks.index(int(k)) for k in look])
    L = len(keep_looks)
    counts = torch.bincount(index, minlength=L).double()
    sums = torch.zeros(L, x.shape[1], dtype=torch.float64).index_add_(0, index, x)
    centroids = sums / counts[:, None]
    # leave-one-out: an embedding's own look centroid without it
    own = (sums[index] - x) / (counts[index] - 1)[:, None]
    dist = torch.cdist(x, centroids)
    dist[torch.arange(len(x)), index] = (x - own).norm(dim=-1)
    out = {"look_accuracy": 100.0 * float((dist.argmin(1) == index).double().mean()),
           "look_chance": 100.0 * float(counts.max() / counts.sum()),
           "centroid_distance": float(torch.pdist(centroids).mean()),
           "within_distance": float((x - centroids[index]).norm(dim=-1).mean()),
           "embeddings": int(len(x))}
    if components is not None:
        comp = components[keep]
        right = 0
        for c in torch.unique(comp):
            members = index[comp == c]
            right += int(torch.bincount(members, minlength=L).max())
        out.update(component_purity=100.0 * right / len(x), component_chance=out["look_chance"],
                   components_used=int(torch.unique(comp).numel()))
    return out


def summarize(per_class):
    """{class: look_statistics dict} -> the means over the classes, ``classes`` and ``pairs``."""
    rows = [r for r in per_class.values() if r is not None]
    keys = ["look_accuracy", "look_chance", "centroid_distance", "within_distance", "component_purity",
            "component_chance", "components_used"]
    out = {k: (sum(r[k] for r in rows) / len(rows) if rows and all(k in r for r in rows) else None) for k in keys}
    out.update(classes=len(rows), pairs=sum(r["embeddings"] for r in rows))
    return out


def evaluate(cfg, weights, dataset, output_json):
    import torch
    from torch.nn import functional as F

    model, loader, info = load_model_and_info(cfg, weights, dataset, needs="the objects' looks")
    clips = info["clips"]
    mixtures = getattr(model.class_predictor, "mixtures", None)
    captured = capture_decoder_outputs(model)
    embs, classes, looks = [], [], []
    torch.manual_seed(0)  # the matcher samples its points at random
    with torch.no_grad():
        for inputs in loader:
            model(inputs)
            out = captured["outputs"]
            targets, indices = match_queries(model, inputs, out)
            for b, (x, (src, tgt)) in enumerate(zip(inputs, indices)):
                objects = clips[x["clip_id"]][int(x["frame_index"])]["objects"]
                for q, label in zip(src.tolist(), targets[b]["labels"][tgt].tolist()):
                    found = [o for o in objects if o["sounding"] and o["class_id"] == label and "look" in o]
                    if len(found) != 1:  # background, or no single sounding object of the class
                        continue
                    embs.append(out["query_embeddings"][b, q].float())
                    classes.append(label)
                    looks.append(int(found[0]["look"]))
    if not embs:
        raise ValueError(f"{dataset}: no matched query of a sounding object with a recorded look (is it a "
                         "'hard_multimodal' synthetic dataset?)")
    x = F.normalize(torch.stack(embs), dim=-1)
    classes, looks = torch.tensor(classes), torch.tensor(looks)
    comp = None
    if mixtures is not None:
        comp = mixtures.component_log_prob(x)[torch.arange(len(x)), classes].argmax(-1)
    per_class = {int(c): look_statistics(x[classes == c], looks[classes == c],
                                         None if comp is None else comp[classes == c])
                 for c in torch.unique(classes)}
    result = {"summary": summarize(per_class), "per_class": per_class, "weights": os.path.abspath(weights),
              "dataset": dataset}
    write_json(result, output_json)
    return result


def main(argv=None):
    cfg, weights, dataset, output = setup_from_cli(__doc__, "look_modes.json", argv, datasets_root=DATASETS)
    s = evaluate(cfg, weights, dataset, output)["summary"]
    line = (f"[eval_look_modes] {dataset}: {s['classes']} classes, {s['pairs']} matched queries; nearest look "
            f"centroid right {s['look_accuracy']:.1f}% (commonest look {s['look_chance']:.1f}%); look centroids "
            f"{s['centroid_distance']:.3f} apart, embeddings {s['within_distance']:.3f} from their own")
    if s["component_purity"] is not None:
        line += (f"; mixture components: purity {s['component_purity']:.1f}% (one component "
                 f"{s['component_chance']:.1f}%), {s['components_used']:.2f} used per class")
    print(line + f". Wrote {output}", flush=True)
    return s


if __name__ == "__main__":
    main()
