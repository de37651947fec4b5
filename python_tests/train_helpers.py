"""Shared by the test_train_* files: a tiny CIFAR-10 in the exact on-disk format.

Written from the format's description (cs.toronto.edu/~kriz/cifar.html), not
from train/data.py, so the real reader is tested against an independent writer.
"""
import os
import pickle
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `import train` from the repo root, however pytest was started
    sys.path.insert(0, ROOT)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_batch(path, images, labels, name):
    """images uint8 [n, 32, 32, 3] -> the pickled dict of one CIFAR-10 batch file."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # R plane, G plane, B plane
    batch = {b"batch_label": name.encode(), b"labels": [int(y) for y in labels], b"data": data,
             b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(images))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def fabricate_cifar(root, per_batch=20, test=20, seed=0):
    """root/cifar-10-batches-py with 5 training batches of `per_batch` images and a
    test batch of `test`, classes balanced, images brighter with the class id so
    there is something to learn.  Returns (train images, train labels) as written."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    all_x, all_y, offset = [], [], 0
    for i, (name, n) in enumerate([(f"data_batch_{k}", per_batch) for k in range(1, 6)] + [("test_batch", test)]):
        # Consecutive class ids across the training batches: balanced overall for any batch size.
        labels = rng.permutation((offset + np.arange(n)) % 10)
        offset = offset + n if name != "test_batch" else 0
        images = rng.integers(0, 64, size=(n, 32, 32, 3)).astype(np.uint8) + (labels * 19)[:, None, None, None].astype(np.uint8)
        write_batch(os.path.join(folder, name), images, labels, f"batch {i + 1} of 5" if i < 5 else "testing batch 1 of 1")
        if name != "test_batch":
            all_x.append(images)
            all_y.append(labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return np.concatenate(all_x), np.concatenate(all_y)
