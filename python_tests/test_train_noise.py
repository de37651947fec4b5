"""Label noise: exact counts, no self-flips, uniformity, the asymmetric pairs,
and the official recipe's sequential-flip quirk (cat->dog ~ eta (1 - eta))."""
import numpy as np
import pytest

import train_helpers  # noqa: F401  (puts the repo root on sys.path)
from train.noise import make_noisy_labels, noise_record

# truck->automobile, bird->airplane, deer->horse, cat->dog, dog->cat, by CIFAR-10 index.
PAIRS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def unbalanced_labels(seed=0):
    sizes = [500, 430, 610, 377, 520, 455, 600, 389, 512, 480]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(labels), sizes


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.45, 0.8])
def test_symmetric_exact_counts_and_no_self_flips(rate):
    clean, sizes = unbalanced_labels()
    noisy = make_noisy_labels(clean, "sym", rate, seed=3)
    for c, n in enumerate(sizes):
        members = clean == c
        # Every chosen sample changes class, so "changed" counts the chosen ones.
        assert (noisy[members] != c).sum() == int(rate * n)
    record = noise_record(clean, noisy)
    assert record["realised_rate"] == pytest.approx(sum(int(rate * n) for n in sizes) / len(clean))
    assert np.allclose(np.diag(record["transition"]), [1 - int(rate * n) / n for n in sizes], atol=1e-6)
    assert np.allclose(np.sum(record["transition"], axis=1), 1.0, atol=1e-5)


def test_symmetric_is_uniform_over_the_other_classes():
    clean = np.repeat(np.arange(10), 5000)
    noisy = make_noisy_labels(clean, "sym", 0.9, seed=0)
    counts = np.array(noise_record(clean, noisy)["transition_counts"])
    off = counts[~np.eye(10, dtype=bool)].reshape(10, 9)
    expected = 4500 / 9  # 500 per other class; binomial sd ~21
    assert np.all(np.abs(off - expected) < 6 * np.sqrt(expected))


def test_noise_seed_decides_the_draw():
    clean, _ = unbalanced_labels()
    a = make_noisy_labels(clean, "sym", 0.4, seed=1)
    assert np.array_equal(a, make_noisy_labels(clean, "sym", 0.4, seed=1))
    assert not np.array_equal(a, make_noisy_labels(clean, "sym", 0.4, seed=2))


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.4])
def test_asymmetric_exact_pairs(rate):
    clean, sizes = unbalanced_labels()
    noisy = make_noisy_labels(clean, "asym", rate, seed=5)
    counts = np.array(noise_record(clean, noisy)["transition_counts"])
    for c, n in enumerate(sizes):
        if c in PAIRS:
            assert counts[c, PAIRS[c]] == int(rate * n)
            assert counts[c, c] == n - int(rate * n)
        else:
            assert counts[c, c] == n  # frog, ship, airplane, automobile, horse stay
    assert counts.sum() - np.trace(counts) == sum(int(rate * sizes[s]) for s in PAIRS)


def test_official_recipe_flips_cats_back():
    eta, n = 0.4, 5000
    clean = np.repeat(np.arange(10), n)
    noisy = make_noisy_labels(clean, "asym", eta, seed=0, recipe="official")
    t = np.array(noise_record(clean, noisy)["transition"])
    # Cats flipped to dog join the dog pool, and a share eta of that pool flips to cat.
    assert t[3, 5] == pytest.approx(eta * (1 - eta), abs=0.015)
    assert t[5, 3] == pytest.approx(eta, abs=0.015)
    # The other pairs are untouched by the quirk.
    for source, target in ((9, 1), (2, 0), (4, 7)):
        assert t[source, target] == pytest.approx(eta, abs=1e-9)
    exact = np.array(noise_record(clean, make_noisy_labels(clean, "asym", eta, seed=0))["transition"])
    assert exact[3, 5] == pytest.approx(eta, abs=1e-9)


def test_bad_arguments():
    clean, _ = unbalanced_labels()
    with pytest.raises(ValueError, match="noise type"):
        make_noisy_labels(clean, "pair", 0.2, seed=0)
    with pytest.raises(ValueError, match="rate"):
        make_noisy_labels(clean, "sym", 1.5, seed=0)
