"""Task mixing: draw mixed-task batches of row indices, proportional or temperature-scaled.

With n_t rows for task t, each example of a batch comes from task t with probability
p_t ∝ n_t^(1/T): T = 1 is proportional sampling, larger T flattens the mix so small tasks
are not drowned by big ones (T → ∞ is uniform over tasks). Within a task, rows are visited
in a fresh random permutation per pass. Everything derives from (seed, stream), and the
state (RNG + positions + passes) is small and plain, so a resumed run draws exactly the
batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

STRATEGIES = ("proportional", "temperature")


def task_probabilities(
    counts: Mapping[int, int] | np.ndarray, strategy: str = "temperature", temperature: float = 1.0
) -> np.ndarray:
    """(T,) mixing probabilities from per-task row counts; tasks with no rows get 0."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or (n < 0).any():
        raise ValueError(f"counts must be a 1-D array of non-negative row counts, got {counts}")
    if n.sum() == 0:
        raise ValueError("no rows for any task: nothing to sample")
    inv_t = 1.0 if strategy == "proportional" else 1.0 / temperature
    w = np.where(n > 0, n**inv_t, 0.0)
    return w / w.sum()


class TaskSampler:
    """Yields (B,) row indices into one worker's rows, tasks mixed by `task_probabilities`.

    task_ids: (N,) task id of every local row. counts: global per-task row counts (all
    workers) so every worker mixes with the same p_t; defaults to the local counts. Tasks
    present globally but absent from this worker's rows are dropped and the rest renormalised.
    """

    def __init__(
        self,
        task_ids: np.ndarray,
        num_tasks: int,
        strategy: str = "temperature",
        temperature: float = 1.0,
        seed: int = 0,
        stream: int = 0,
        counts: np.ndarray | None = None,
    ):
        task_ids = np.asarray(task_ids)
        if task_ids.ndim != 1:
            raise ValueError(f"task_ids must be 1-D, got shape {task_ids.shape}")
        if task_ids.size and (task_ids.min() < 0 or task_ids.max() >= num_tasks):
            raise ValueError(f"task ids must lie in 0..{num_tasks - 1}")
        self.num_tasks = num_tasks
        self.seed, self.stream = int(seed), int(stream)
        # Row indices of each task, in a stable order (the pools never change).
        order = np.argsort(task_ids, kind="stable")
        local = np.bincount(task_ids, minlength=num_tasks)
        self.pools = np.split(order, np.cumsum(local)[:-1])
        base = local if counts is None else np.asarray(counts)
        if len(base) != num_tasks:
            raise ValueError(f"counts has {len(base)} entries, expected {num_tasks}")
        self.probs = task_probabilities(np.where(local > 0, base, 0), strategy, temperature)
        self.rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.seed, self.stream]))
        )
        self.positions = [0] * num_tasks
        self.passes = [0] * num_tasks
        self._perms = [self._permutation(t) for t in range(num_tasks)]

    def _permutation(self, task: int) -> np.ndarray:
        # Pass p of task t is a permutation derived from (seed, stream, t, p) alone: the
        # state never stores permutations.
        ss = np.random.SeedSequence([self.seed, self.stream, task, self.passes[task], 1])
        return np.random.Generator(np.random.PCG64(ss)).permutation(self.pools[task])

    def next_batch(self, batch_size: int) -> np.ndarray:
        """(B,) row indices; tasks drawn i.i.d. from probs, rows without replacement per pass."""
        tasks = self.rng.choice(self.num_tasks, size=batch_size, p=self.probs)  # (B,)
        out = np.empty(batch_size, dtype=np.int64)
        for t in np.unique(tasks):
            slots = np.flatnonzero(tasks == t)
            out[slots] = self._take(int(t), len(slots))
        return out

    def _take(self, task: int, k: int) -> np.ndarray:
        got = []
        while k > 0:
            perm, pos = self._perms[task], self.positions[task]
            chunk = perm[pos : pos + k]
            got.append(chunk)
            k -= len(chunk)
            self.positions[task] = pos + len(chunk)
            if self.positions[task] >= len(perm):
                self.passes[task] += 1
                self.positions[task] = 0
                self._perms[task] = self._permutation(task)
        return np.concatenate(got)

    def state_dict(self) -> dict:
        """Plain Python state (ints, strs, lists): safe for torch.load(weights_only=True)."""
        return {
            "seed": self.seed,
            "stream": self.stream,
            "rng": self.rng.bit_generator.state,
            "positions": list(self.positions),
            "passes": list(self.passes),
            "pool_sizes": [len(p) for p in self.pools],
        }

    def load_state_dict(self, state: dict) -> None:
        sizes = [len(p) for p in self.pools]
        if state["pool_sizes"] != sizes:
            raise ValueError(
                f"sampler state is for per-task pools {state['pool_sizes']}, these rows have {sizes}"
            )
        self.seed, self.stream = int(state["seed"]), int(state["stream"])
        self.rng.bit_generator.state = state["rng"]
        self.positions = [int(x) for x in state["positions"]]
        self.passes = [int(x) for x in state["passes"]]
        self._perms = [self._permutation(t) for t in range(self.num_tasks)]
