import hashlib

import numpy as np
import pytest
import torch

from seedtune.shared.engine.directions import direction_numpy, direction_torch
from tests.helpers import run_python

SEEDS = [0, 1, 12345, 2**63 + 7, 2**64 - 1]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("start,count", [(0, 1), (0, 1000), (5, 999), (31, 33), (1_000_003, 4097)])
def test_rademacher_torch_equals_numpy_bit_for_bit(seed, start, count):
    t = direction_torch(seed, start, count)
    n = direction_numpy(seed, start, count)
    assert t.dtype == torch.float32 and n.dtype == np.float32
    assert np.array_equal(t.numpy(), n)
    assert set(np.unique(n)) <= {-1.0, 1.0}


def test_slices_agree_with_the_whole():
    whole = direction_torch(99, 0, 10_000)
    for start, count in [(0, 10_000), (1, 77), (4096, 3000), (9_999, 1)]:
        assert torch.equal(whole[start : start + count], direction_torch(99, start, count))


def test_directions_are_balanced_and_seed_dependent():
    a, b = direction_numpy(3, 0, 200_000), direction_numpy(4, 0, 200_000)
    assert abs(a.mean()) < 0.01
    assert abs(float(a @ b) / len(a)) < 0.01  # different seeds: nearly orthogonal
    assert not np.array_equal(a, b)


def test_same_in_a_separate_process():
    code = ("from seedtune.shared.engine.directions import direction_torch, direction_numpy; import hashlib; "
            "print(hashlib.sha256(direction_torch(2**64-5, 17, 100000).numpy().tobytes()).hexdigest(), "
            "hashlib.sha256(direction_numpy(2**64-5, 17, 100000).tobytes()).hexdigest())")
    here = hashlib.sha256(direction_torch(2**64 - 5, 17, 100000).numpy().tobytes()).hexdigest()
    assert run_python(code).split() == [here, here]


def test_gaussian_option_matches_numpy_bit_for_bit_and_is_standard_normal():
    for seed, start, count in [(7, 3, 200_000), (2**64 - 1, 1, 1), (5, 2**33 + 1, 3_000)]:
        t = direction_torch(seed, start, count, "gaussian")
        assert np.array_equal(t.numpy(), direction_numpy(seed, start, count, "gaussian")), (seed, start, count)
        assert np.array_equal(direction_torch(seed, start, count, "gaussian", dtype=torch.float64).numpy(),
                              direction_numpy(seed, start, count, "gaussian", dtype=np.float64))
    whole = direction_torch(3, 5, (1 << 20) + 9, "gaussian")  # longer than a chunk: generated piece by piece
    assert np.array_equal(whole.numpy(), direction_numpy(3, 5, (1 << 20) + 9, "gaussian"))
    t = direction_torch(7, 3, 200_000, "gaussian")
    assert abs(float(t.mean())) < 0.01 and abs(float(t.std()) - 1) < 0.01
    assert torch.equal(direction_torch(7, 10, 5, "gaussian"), t[7:12])
    assert 2.9 < float((t.double() ** 4).mean()) < 3.1  # a normal's kurtosis, not a uniform's 1.8


def test_normal_levels_are_symmetric_with_unit_variance():
    from seedtune.shared.engine.directions import LEVELS, normal_levels

    levels = normal_levels()
    assert levels.shape == (LEVELS,) and np.all(np.diff(levels) > 0)
    assert np.array_equal(levels, -levels[::-1])
    assert abs(float(np.mean(levels**2)) - 1) < 1e-12 and 4.3 < levels[-1] < 4.4


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_scale_and_scratch_give_the_same_values(kind):
    from seedtune.shared.engine.directions import SCRATCH_EXTRA

    plain = direction_torch(11, 37, 5_000, kind)
    scratch = torch.full((5_000 + SCRATCH_EXTRA,), float("nan"))
    scaled = direction_torch(11, 37, 5_000, kind, scale=-0.25, scratch=scratch)
    assert scaled.data_ptr() >= scratch.data_ptr() and scaled.numel() == 5_000
    assert torch.equal(scaled, plain * -0.25)
    with pytest.raises(ValueError, match="scratch must be"):
        direction_torch(11, 37, 5_000, kind, scratch=torch.empty(100))
    for start in range(0, 64, 3):  # every alignment fits in count + SCRATCH_EXTRA
        for count in (1, 31, 32, 33, 95):
            got = direction_torch(5, start, count, kind, scratch=torch.empty(count + SCRATCH_EXTRA))
            assert torch.equal(got, direction_torch(5, start, count, kind)), (start, count)


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "3", True])
def test_bad_seed_is_rejected_naming_it(bad):
    with pytest.raises(ValueError, match="seed"):
        direction_torch(bad, 0, 4)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown direction kind 'uniform'"):
        direction_numpy(1, 0, 4, "uniform")


def test_the_byte_table_generator_reproduces_the_reference_stream_bit_for_bit():
    """Ledgers depend on the stream: the fast torch path equals the original int64 bit expansion
    (tests/reference_directions.py) on many seeds, offsets not aligned to 32 and counts, in float32 and float64."""
    import torch

    from tests.reference_directions import rademacher_reference

    rng = np.random.default_rng(22)
    cases = [(0, 0, 1), (2**64 - 1, 31, 33), (7, 32, 32), (7, 1, 100_003), (9, 45, (1 << 20) * 2 + 77)]
    cases += [(int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2)), int(rng.integers(0, 10**7)),
               int(rng.integers(1, 70_000))) for _ in range(40)]
    for seed, start, count in cases:
        expected = rademacher_reference(seed, start, count)
        assert torch.equal(direction_torch(seed, start, count), expected), (seed, start, count)
        assert torch.equal(direction_torch(seed, start, count, dtype=torch.float64), expected.double())
        assert np.array_equal(direction_numpy(seed, start, count), expected.numpy())


def test_hadamard_directions_are_a_tight_frame_the_same_in_torch_and_numpy():
    """n = 2^m Hadamard rows under one sign key: sum_k z_k z_k^T = n I exactly on any d <= n entries (what makes a
    head step over them DP-SGD); entries +-1, torch equal to numpy bit for bit, slices equal to the whole, and
    different keys give different signs."""
    from seedtune.shared.engine.directions import seed_stream, step_seeds

    seeds = step_seeds("hadamard", seed_stream(11), 256)
    assert len({s >> 32 for s in seeds}) == 1 and [s & 0xFFFFFFFF for s in seeds] == list(range(256))
    z = np.stack([direction_numpy(s, 0, 200, "hadamard") for s in seeds]).astype(np.float64)
    np.testing.assert_array_equal(z.T @ z, 256 * np.eye(200))
    for seed, start, count in [(seeds[37], 0, 200), (2**64 - 1, 5, 3000), (seeds[3], 2**32 - 7, 20),
                               (9 << 32 | 5, 3, (1 << 20) + 9)]:
        t = direction_torch(seed, start, count, "hadamard")
        np.testing.assert_array_equal(t.numpy(), direction_numpy(seed, start, count, "hadamard"))
        assert set(np.unique(t.numpy())) <= {-1.0, 1.0}
    np.testing.assert_array_equal(direction_torch(seeds[5], 0, 200, "hadamard", scale=0.25).numpy(), 0.25 * z[5])
    other = step_seeds("hadamard", seed_stream(12), 2)
    assert not np.array_equal(direction_numpy(other[1], 0, 200, "hadamard"), z[1])
