"""Interleaved wall-clock timing of two (or more) models on the same inputs.

Per repeat, input i goes to every runner in turn (A B A B ...), so machine noise (other jobs,
frequency changes) hits all of them alike; the order rotates every repeat so no runner always
follows the other. The reported time of a runner is the median over repeats of its per-repeat
mean; the ratio of a runner to the first one is the median of the per-repeat ratios (each
ratio compares steps that ran side by side), not the ratio of the medians.
"""
import statistics
import time

__all__ = ["interleaved", "median_ratio"]


def median_ratio(numerators, denominators):
    """Median of the element-wise ratios of two equally long lists -> (median, ratios)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"need two non-empty lists of one length, got "
                         f"{len(numerators)} and {len(denominators)}")
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return statistics.median(ratios), ratios


def interleaved(runners, num_inputs, iters, warmup, repeats, clock=time.perf_counter, sync=lambda: None):
    """Time ``runners`` ({name: fn(input_index)}) interleaved.

    ``warmup`` untimed rounds first; then ``repeats`` repeats of ``iters`` rounds, a round running
    input ``k % num_inputs`` on every runner. Each call is timed with ``clock`` between two
    ``sync()`` calls. Returns (times, ratios):
    times[name] = {"median_s", "per_repeat_mean_s", "median_step_s", "order"} and
    ratios[name] = {"median", "per_repeat"} for every runner but the first (relative to it).
    ``order`` lists, per repeat, the runner names of its first round in call order."""
    if iters < 1 or repeats < 1 or warmup < 0 or num_inputs < 1:
        raise ValueError(f"need iters >= 1, repeats >= 1, warmup >= 0 and inputs >= 1, "
                         f"got {iters}, {repeats}, {warmup}, {num_inputs}")
    names = list(runners)
    order = list(names)
    for i in range(warmup):
        for n in order:
            runners[n](i % num_inputs)
    times = {n: [[] for _ in range(repeats)] for n in names}
    first_rounds = []
    k = 0
    for r in range(repeats):
        first_rounds.append(list(order))
        for _ in range(iters):
            for n in order:
                sync()
                t0 = clock()
                runners[n](k % num_inputs)
                sync()
                times[n][r].append(clock() - t0)
            k += 1
        order = order[1:] + order[:1]
    res = {}
    for n in names:
        means = [statistics.fmean(t) for t in times[n]]
        res[n] = {
            "median_s": statistics.median(means),
            "per_repeat_mean_s": means,
            "median_step_s": statistics.median([x for t in times[n] for x in t]),
            "order": first_rounds,
        }
    ratios = {}
    for n in names[1:]:
        med, per = median_ratio(res[n]["per_repeat_mean_s"], res[names[0]]["per_repeat_mean_s"])
        ratios[n] = {"median": med, "per_repeat": per}
    return res, ratios
