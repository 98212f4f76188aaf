"""What a class's mixture components model: sub-modes of the class, the decoder's predictions, or
CPM's prompts.

With ``MODEL.MASK_FORMER.GMM.OBSERVE_LAYERS "all"`` a matched query enters its class's bank once per
prediction (the final one and each auxiliary one), in the order ``[final, aux_0, ..., aux_{L-2}]``,
and every copy carries the same (iteration, source) pair. If the components are modes of the class,
the copies of one query fall in one component; if the predictions' embeddings drift apart, the fit
spends its components on the predictions instead, and copies of one query fall in different ones.
With ``OBSERVE_PROMPTS`` the banks also hold the prompts' embeddings (sources from
``PROMPT_SOURCE``), which may take components of their own.

:func:`prediction_agreement` and :func:`prompt_components` measure that from a fitted
:class:`~.mixture.ClassMixtures` alone.
"""
from typing import Dict, List

import torch

from .mixture import _SOURCE_STRIDE, PROMPT_SOURCE, ClassMixtures

__all__ = ["prediction_agreement", "prompt_components"]


@torch.no_grad()
def prediction_agreement(mixtures: ClassMixtures, num_predictions: int) -> Dict[str, List]:
    """Per fitted class, how the copies of one query (one (iteration, source) group of
    ``num_predictions`` bank entries) are assigned to components (each entry to its most likely one).

    Returns a dict of lists over the predictions ``k = 1 .. num_predictions - 1`` (aux_0 first):
    ``agreement[k-1]`` (fraction of complete groups whose copy k is in the same component as the
    final prediction's copy), ``distance[k-1]`` (mean Euclidean distance of copy k to the final
    copy, in the modelled space: unit vectors with ``normalize``), ``chance`` (the agreement two
    entries drawn independently from the bank would have: sum_m share_m ** 2, averaged over the
    classes), ``groups`` (complete groups counted) and ``classes`` (fitted classes counted).
    Groups with fewer copies (the ring buffer overwrote some, or an auxiliary prediction's
    matching gave the query another label) are skipped: the position of a copy is then ambiguous.
    """
    if num_predictions < 2:
        raise ValueError(f"num_predictions must be >= 2 (the final prediction and at least one more), got {num_predictions}")
    K, S, M = mixtures.num_mixtures, mixtures.memory_size, mixtures.num_components
    valid = mixtures.bank_valid_mask()
    agree = torch.zeros(num_predictions - 1, dtype=torch.float64)
    dist = torch.zeros(num_predictions - 1, dtype=torch.float64)
    chance, groups, classes = 0.0, 0, 0
    for k in range(K):
        n = int(valid[k].sum())
        if not bool(mixtures.initialized[k]) or n < num_predictions:
            continue
        # arrival order: the oldest slot first once the ring has wrapped
        start = int(mixtures.bank_ptr[k]) if n == S else 0
        slots = (torch.arange(n) + start) % S
        x = mixtures.prepare(mixtures.bank[k, slots].double())
        comp = mixtures.component_log_prob(x)[:, k].argmax(-1)
        share = torch.bincount(comp, minlength=M).double() / n
        chance += float((share ** 2).sum())
        classes += 1
        key = mixtures.bank_iter[k, slots] * (1 << 40) + mixtures.bank_source[k, slots]
        # the copies of one query share a key; a stable sort keeps them in arrival order (final first)
        order = torch.sort(key, stable=True).indices
        key, comp, x = key[order], comp[order], x[order]
        change = torch.ones(n, dtype=torch.bool)
        change[1:] = key[1:] != key[:-1]
        run_start = torch.nonzero(change).squeeze(1)
        run_len = torch.diff(torch.cat([run_start, torch.tensor([n])]))
        for s in run_start[run_len == num_predictions].tolist():
            agree += (comp[s + 1: s + num_predictions] == comp[s]).double()
            dist += (x[s + 1: s + num_predictions] - x[s]).norm(dim=-1)
            groups += 1
    if groups == 0:
        raise ValueError(f"no bank holds a complete group of {num_predictions} copies of one query: were the banks "
                         "filled with OBSERVE_LAYERS 'all' and that many predictions?")
    return {"agreement": (agree / groups).tolist(), "distance": (dist / groups).tolist(),
            "chance": chance / classes, "groups": groups, "classes": classes}


@torch.no_grad()
def prompt_components(mixtures: ClassMixtures, first_prompt_source: int = PROMPT_SOURCE) -> Dict[str, float]:
    """Whether the prompts' bank entries (sources from ``first_prompt_source`` within a rank's
    stride) and the matched queries' lie in the same components: each entry is assigned to its most
    likely component of its class.

    Over the fitted classes whose bank holds both kinds (``classes``): ``separated`` (classes where
    the component holding most prompt entries is not the one holding most query entries),
    ``prompt_share`` (mean fraction of a class's prompt entries in the prompts' majority component),
    ``query_share`` (mean fraction of its query entries in that same component) and
    ``prompt_fraction`` (prompt entries / all entries of those banks).
    """
    valid = mixtures.bank_valid_mask()
    M = mixtures.num_components
    classes, separated, prompt_share, query_share, prompts, total = 0, 0, 0.0, 0.0, 0, 0
    for k in range(mixtures.num_mixtures):
        if not bool(mixtures.initialized[k]):
            continue
        x = mixtures.prepare(mixtures.bank[k, valid[k]].double())
        is_prompt = mixtures.bank_source[k, valid[k]] % _SOURCE_STRIDE >= first_prompt_source
        if not bool(is_prompt.any()) or bool(is_prompt.all()):
            continue
        comp = mixtures.component_log_prob(x)[:, k].argmax(-1)
        of_prompts = int(torch.bincount(comp[is_prompt], minlength=M).argmax())
        of_queries = int(torch.bincount(comp[~is_prompt], minlength=M).argmax())
        classes += 1
        separated += int(of_prompts != of_queries)
        prompt_share += float((comp[is_prompt] == of_prompts).double().mean())
        query_share += float((comp[~is_prompt] == of_prompts).double().mean())
        prompts += int(is_prompt.sum())
        total += int(is_prompt.numel())
    if classes == 0:
        raise ValueError("no fitted class's bank holds both prompt and query entries: were the banks filled "
                         "with MODEL.MASK_FORMER.GMM.OBSERVE_PROMPTS True?")
    return {"classes": classes, "separated": separated, "prompt_share": prompt_share / classes,
            "query_share": query_share / classes, "prompt_fraction": prompts / total}
