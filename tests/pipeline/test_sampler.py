"""Task mixing: probabilities, determinism, per-pass coverage, exact resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pipeline.sampler import TaskSampler, task_probabilities


def test_probabilities_proportional_and_temperature():
    counts = np.array([900, 100, 0])
    np.testing.assert_allclose(task_probabilities(counts, "proportional"), [0.9, 0.1, 0.0])
    # T = 2: p ∝ sqrt(n) -> 30 : 10
    np.testing.assert_allclose(task_probabilities(counts, "temperature", 2.0), [0.75, 0.25, 0.0])
    # Temperature 1 is proportional; a huge temperature tends to uniform over present tasks.
    np.testing.assert_allclose(task_probabilities(counts, "temperature", 1.0), [0.9, 0.1, 0.0])
    np.testing.assert_allclose(
        task_probabilities(counts, "temperature", 1e6), [0.5, 0.5, 0.0], atol=1e-4
    )


@pytest.mark.parametrize(
    "counts, strategy, temperature, match",
    [
        ([0, 0], "temperature", 2.0, "no rows"),
        ([1, 2], "uniform", 2.0, "strategy"),
        ([1, 2], "temperature", 0.0, "temperature"),
        ([1, -2], "temperature", 1.0, "non-negative"),
    ],
)
def test_probabilities_reject_bad_input(counts, strategy, temperature, match):
    with pytest.raises(ValueError, match=match):
        task_probabilities(counts, strategy, temperature)


def _ids(sizes):
    return np.concatenate([np.full(n, t) for t, n in enumerate(sizes)])


def test_empirical_mix_follows_temperature():
    task_ids = _ids([800, 50])
    s = TaskSampler(task_ids, 2, "temperature", 2.0, seed=1)
    drawn = task_ids[np.concatenate([s.next_batch(64) for _ in range(200)])]
    share_small = (drawn == 1).mean()
    expected = np.sqrt(50) / (np.sqrt(50) + np.sqrt(800))  # 0.2
    assert abs(share_small - expected) < 0.02
    prop = TaskSampler(task_ids, 2, "proportional", seed=1)
    drawn = task_ids[np.concatenate([prop.next_batch(64) for _ in range(200)])]
    assert abs((drawn == 1).mean() - 50 / 850) < 0.015


def test_each_pass_visits_every_row_once():
    task_ids = _ids([7, 5])
    s = TaskSampler(task_ids, 2, "proportional", seed=3)
    seen = {0: [], 1: []}
    while len(seen[1]) < 5 * 4:
        for i in s.next_batch(3):
            seen[int(task_ids[i])].append(int(i))
    small = seen[1][:20]
    for p in range(4):  # every pass of task 1 is a permutation of its 5 rows
        assert sorted(small[5 * p : 5 * p + 5]) == [7, 8, 9, 10, 11]
    assert small[:5] != small[5:10] or small[5:10] != small[10:15]  # passes reshuffle


def test_deterministic_and_streams_differ():
    task_ids = _ids([40, 30, 20])
    a = TaskSampler(task_ids, 3, seed=5, stream=0)
    b = TaskSampler(task_ids, 3, seed=5, stream=0)
    c = TaskSampler(task_ids, 3, seed=5, stream=1)
    xa = [a.next_batch(8) for _ in range(10)]
    xb = [b.next_batch(8) for _ in range(10)]
    xc = [c.next_batch(8) for _ in range(10)]
    assert all((p == q).all() for p, q in zip(xa, xb))
    assert not all((p == q).all() for p, q in zip(xa, xc))


def test_resume_continues_exactly_through_torch_save():
    task_ids = _ids([13, 9, 4])
    ref = TaskSampler(task_ids, 3, "temperature", 1.5, seed=9)
    expected = [ref.next_batch(5) for _ in range(30)]

    first = TaskSampler(task_ids, 3, "temperature", 1.5, seed=9)
    got = [first.next_batch(5) for _ in range(12)]
    buf = io.BytesIO()
    torch.save({"sampler": first.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["sampler"]
    second = TaskSampler(task_ids, 3, "temperature", 1.5, seed=0)  # seed comes from the state
    second.load_state_dict(state)
    got += [second.next_batch(5) for _ in range(18)]
    assert all((p == q).all() for p, q in zip(expected, got))


def test_global_counts_and_missing_local_task():
    # Rows of task 2 live on another worker: never drawn here, the others renormalised.
    local = _ids([10, 10])
    s = TaskSampler(local, 3, "proportional", counts=np.array([30, 10, 60]), seed=0)
    np.testing.assert_allclose(s.probs, [0.75, 0.25, 0.0])
    assert set(local[np.concatenate([s.next_batch(16) for _ in range(20)])]) == {0, 1}


def test_state_for_other_rows_is_refused():
    s = TaskSampler(_ids([4, 4]), 2)
    other = TaskSampler(_ids([4, 5]), 2)
    with pytest.raises(ValueError, match="pools"):
        other.load_state_dict(s.state_dict())


def test_bad_task_ids():
    with pytest.raises(ValueError, match="0..1"):
        TaskSampler(np.array([0, 2]), 2)
