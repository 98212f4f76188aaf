"""What exact resume needs besides weights and optimizer: random-number states and the data order.

A run interrupted after iteration ``k`` and resumed with ``--resume`` repeats the uninterrupted
run's iterations ``k+1, ...`` exactly (same batches, same random draws, same losses) on CPU,
because the checkpoint of iteration ``k`` also holds:

* **the global random states of every rank** (:func:`get_rng_state` / :func:`set_rng_state`):
  torch CPU, torch CUDA (when initialised), numpy's global ``np.random``, python ``random``.
  Whatever the model draws from them (prompt sampling, PCL pixels, the criterion's points, and
  any draw added later) continues where the interrupted run stopped. They are captured at the
  end of each step, before the hooks, so the states saved are the ones step ``k+1`` starts from.
* **the data order** (:class:`ResumableTrainLoader`): detectron2's ``TrainingSampler`` stream
  (one seeded permutation per epoch, rank ``r`` of ``w`` taking every ``w``-th index), cut into
  per-rank batches, optionally grouped by aspect ratio like ``AspectRatioGroupedDataset``.
  Batch ``j`` is a pure function of ``(seed, rank, world size, batch size, j)``, so resuming
  at iteration ``k+1`` means starting the stream at batch ``k+1``: the checkpoint stores the
  stream's seed and shape, not a live iterator.

Random draws that are *not* the training stream are kept out of it:

* the mapper of batch ``j`` (detectron2 augmentations use ``np.random``; ``AVSDatasetMapper``
  re-seeds its noise generator from ``torch.initial_seed()``) runs under :func:`isolated_rng`
  seeded by ``(seed, rank, j)``, in the main process or in a loader worker alike. The batch is
  therefore the same with any ``DATALOADER.NUM_WORKERS``, and mapping never moves the training
  stream;
* hooks (evaluation, its data loaders, STS, writers) run after each step under a stream seeded
  by ``(seed, rank, iteration)``, and the training stream is put back afterwards.

Checkpoint contents are plain tensors, lists and numbers, so ``torch.load(weights_only=True)``
reads them.
"""
import contextlib
import logging
import random
from functools import partial

import numpy as np
import torch
import torch.utils.data as torchdata

__all__ = [
    "get_rng_state",
    "set_rng_state",
    "isolated_rng",
    "derive_seed",
    "hooks_seed",
    "ResumableTrainLoader",
    "TrainBatchStream",
]

logger = logging.getLogger(__name__)

# Tags that keep the derived seed streams apart.
_TAG_BATCH, _TAG_HOOKS, _TAG_WORKER = 1, 2, 3


def derive_seed(*values):
    """A 32-bit seed from non-negative integers (numpy ``SeedSequence``: well mixed, platform independent)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(1)[0])


def hooks_seed(seed, rank, iteration):
    """Seed of the stream the hooks draw from after ``iteration`` (see the module docstring)."""
    return derive_seed(seed, _TAG_HOOKS, rank, iteration)


# ------------------------------------------------------------------------------ random states
def _numpy_state_to_plain(state):
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_from_plain(d):
    return (d["name"], d["keys"].numpy().astype(np.uint32), int(d["pos"]), int(d["has_gauss"]),
            float(d["cached_gaussian"]))


def _python_state_to_plain(state):
    version, internal, gauss_next = state
    return {"version": int(version), "state": list(internal), "gauss_next": gauss_next}


def _python_state_from_plain(d):
    return (int(d["version"]), tuple(int(x) for x in d["state"]), d["gauss_next"])


def _cuda_active():
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def get_rng_state(plain=False):
    """The global random states of this process: torch CPU (+ CUDA when initialised), numpy, python.

    ``plain=True`` returns only tensors, lists, numbers and strings (``weights_only``-loadable).
    """
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if _cuda_active():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if plain:
        state["numpy"] = _numpy_state_to_plain(state["numpy"])
        state["python"] = _python_state_to_plain(state["python"])
    return state


def set_rng_state(state):
    """Restore a state from :func:`get_rng_state` (either form)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(_numpy_state_from_plain(np_state) if isinstance(np_state, dict) else np_state)
    py_state = state["python"]
    random.setstate(_python_state_from_plain(py_state) if isinstance(py_state, dict) else py_state)
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                f"the checkpoint holds CUDA random states of {len(cuda)} device(s), this process sees "
                f"{torch.cuda.device_count()}: CUDA random draws are not restored"
            )


@contextlib.contextmanager
def isolated_rng(seed=None):
    """Run a block on its own random streams and give the surrounding code its states back.

    With ``seed``, torch's CPU generator, ``np.random`` and ``random`` are seeded with it inside
    the block (the CUDA generators are not re-seeded, only restored afterwards).
    """
    saved = get_rng_state()
    try:
        if seed is not None:
            torch.default_generator.manual_seed(int(seed))
            np.random.seed(int(seed) & 0xFFFFFFFF)
            random.seed(int(seed))
        yield
    finally:
        set_rng_state(saved)


# ------------------------------------------------------------------------------ data order
class TrainBatchStream(torchdata.IterableDataset):
    """Infinite stream of mapped training batches that can start at any batch index.

    Indices: detectron2's ``TrainingSampler`` stream (``randperm(n)`` per epoch from a generator
    seeded with ``seed``; rank ``r`` takes positions ``r, r + w, ...``). Batches: consecutive
    ``batch_size`` indices of this rank, or, with ``aspect_ratio_grouping``, the first
    ``batch_size`` indices of a bucket (``width > height`` or not), as detectron2's
    ``AspectRatioGroupedDataset`` does. Batch ``j`` is mapped under :func:`isolated_rng` seeded
    by ``(seed, rank, j)``. Under a ``DataLoader`` with ``n`` workers, worker ``i`` maps batches
    ``start + i, start + i + n, ...``: the loader's round-robin returns them in order.
    """

    def __init__(self, dataset, mapper, *, batch_size, seed, rank=0, world_size=1, shuffle=True,
                 aspect_ratio_grouping=False):
        if not len(dataset):
            raise ValueError("the training set is empty (DATASETS.TRAIN has no dataset dict)")
        if batch_size <= 0:
            raise ValueError(f"batch size per process must be positive, got {batch_size}")
        self.dataset = dataset
        self.mapper = mapper
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle = bool(shuffle)
        self.aspect_ratio_grouping = bool(aspect_ratio_grouping)
        self.start_batch = 0
        if self.aspect_ratio_grouping:
            missing = [i for i, d in enumerate(dataset) if "width" not in d or "height" not in d]
            if missing:
                d = dataset[missing[0]]
                raise ValueError(
                    f"DATALOADER.ASPECT_RATIO_GROUPING needs 'width' and 'height' in every dataset dict; "
                    f"{len(missing)} lack them, e.g. {d.get('file_name', d)}"
                )
            self._landscape = [int(d["width"]) > int(d["height"]) for d in dataset]

    def _rank_indices(self):
        g = torch.Generator()
        g.manual_seed(self.seed)
        n, pos = len(self.dataset), 0
        while True:
            order = torch.randperm(n, generator=g).tolist() if self.shuffle else range(n)
            for idx in order:
                if pos % self.world_size == self.rank:
                    yield idx
                pos += 1

    def batch_indices(self):
        """Infinite iterator over batches of dataset indices (batch 0 first)."""
        indices = self._rank_indices()
        if not self.aspect_ratio_grouping:
            while True:
                yield [next(indices) for _ in range(self.batch_size)]
        buckets = ([], [])
        for idx in indices:
            bucket = buckets[0 if self._landscape[idx] else 1]
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                del bucket[:]

    def map_batch(self, j, indices):
        with isolated_rng(derive_seed(self.seed, _TAG_BATCH, self.rank, j)):
            out = []
            for idx in indices:
                item = self.mapper(self.dataset[idx])
                if item is None:
                    d = self.dataset[idx]
                    raise RuntimeError(
                        f"the mapper returned None for {d.get('file_name', idx)}; cpm_d2 never skips "
                        "training data silently: raise an error that says what is wrong instead"
                    )
                out.append(item)
        return out

    def __iter__(self):
        info = torchdata.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        start = self.start_batch
        for j, indices in enumerate(self.batch_indices()):
            if j >= start and (j - start) % workers == worker:
                yield self.map_batch(j, indices)


def _identity(batch):
    return batch


def _seed_worker(seed, rank, start_batch, worker_id):
    """Loader workers: global random states from (seed, rank, start batch, worker), not from torch's base seed."""
    s = derive_seed(seed, _TAG_WORKER, rank, start_batch, worker_id)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


class ResumableTrainLoader:
    """Iterable of training batches (lists of mapped dicts) that starts where a checkpoint left off.

    ``start_batch`` and the stream's ``seed`` can be changed until iteration begins (the first
    ``next()``, not ``iter()``): detectron2 0.6's ``SimpleTrainer`` calls ``iter()`` in its
    constructor, before ``resume_or_load`` has read the checkpoint.
    """

    def __init__(self, stream, num_workers=0):
        self.stream = stream
        self.num_workers = int(num_workers)

    @property
    def start_batch(self):
        return self.stream.start_batch

    @start_batch.setter
    def start_batch(self, value):
        self.stream.start_batch = int(value)

    def state_dict(self):
        s = self.stream
        return {"seed": s.seed, "world_size": s.world_size, "batch_size": s.batch_size,
                "dataset_size": len(s.dataset), "shuffle": s.shuffle, "aspect_ratio_grouping": s.aspect_ratio_grouping}

    def load_state_dict(self, state):
        """Continue the checkpointed stream (its seed); warn where the data order cannot be the same."""
        s = self.stream
        mine = self.state_dict()
        if int(state["seed"]) != s.seed:
            logger.info(f"data order: continuing the checkpoint's stream (seed {state['seed']}, config gives {s.seed})")
            s.seed = int(state["seed"])
        changed = [k for k in ("world_size", "batch_size", "dataset_size", "shuffle", "aspect_ratio_grouping")
                   if k in state and state[k] != mine[k]]
        if changed:
            logger.warning(
                "the data order cannot continue exactly: "
                + ", ".join(f"{k} was {state[k]}, is {mine[k]}" for k in changed)
            )

    def __iter__(self):
        if self.num_workers == 0:
            yield from self.stream
            return
        s = self.stream
        loader = torchdata.DataLoader(
            s,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            worker_init_fn=partial(_seed_worker, s.seed, s.rank, s.start_batch),
            # its own generator: creating the iterator draws a base seed, never from the global stream
            generator=torch.Generator().manual_seed(derive_seed(s.seed, _TAG_WORKER, s.rank)),
        )
        yield from loader
