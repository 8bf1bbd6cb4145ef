"""Specification of workbench.data: readers for each real file format, clear errors,
the held-out split, the synthetic dataset's designed hierarchy, and augmentation.

Every reader test writes small files in the dataset's real format; nothing downloads.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import data
from workbench.data import DatasetError, augment, heldout_split, load_dataset, normalize

FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


# ----------------------------------------------------------------------------- helpers

def write_idx(path: Path, array: np.ndarray, magic: int | None = None, compress: bool = True) -> Path:
    """An IDX file as in MNIST: magic 0x00000800 + ndim, big-endian int32 sizes, unsigned bytes."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 + array.ndim if magic is None else magic
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_fashion(folder: Path, split: str = "train", n: int = 12, labels_n: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images = (np.arange(n * 28 * 28) % 251).astype(np.uint8).reshape(n, 28, 28)
    write_idx(folder / FASHION_FILES[split][0], images)
    write_idx(folder / FASHION_FILES[split][1], np.arange(labels_n or n) % 10)
    return folder


@pytest.fixture
def no_fashion_elsewhere(tmp_path, monkeypatch):
    """Hide every place fashion-mnist could be found on this machine."""
    monkeypatch.delenv("WORKBENCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system-not-installed")
    monkeypatch.setattr(data, "EVAL_BUNDLE_DIR", tmp_path / "no-bundle")


def write_pickle(path: Path, obj, protocol: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def cifar_batch(n: int, seed: int, **labels) -> dict:
    rng = np.random.default_rng(seed)
    return {"batch_label": "batch", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img{i}.png" for i in range(n)], **labels}


def write_cifar10(root: Path, n_per_batch: int = 3) -> Path:
    folder = root / "cifar-10-batches-py"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    for i in range(1, 6):   # Python 3 protocol 2 (as re-saved copies often are) ...
        labels = [(i + j) % 10 for j in range(n_per_batch)]
        write_pickle(folder / f"data_batch_{i}", cifar_batch(n_per_batch, i, labels=labels))
    write_pickle(folder / "test_batch", cifar_batch(4, 0, labels=[0, 1, 2, 9]), protocol=4)   # ... and protocol 4
    return folder


class ShellCommand:
    """A pickle payload that runs a shell command when unpickled by plain pickle.load."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ----------------------------------------------------------------------------- Fashion-MNIST (IDX gz)

def test_fashion_mnist_reads_idx_gz_files_from_root(tmp_path):
    write_fashion(tmp_path / "fm", "train", n=12)
    ds = load_dataset("fashion-mnist", "train", root=tmp_path / "fm")
    assert len(ds) == 12 and ds.images.dtype == torch.uint8 and ds.image_shape == (1, 28, 28)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [i % 10 for i in range(12)]
    assert ds.images[1, 0, 0, 0] == (28 * 28) % 251   # row-major pixel order kept


def test_fashion_mnist_root_may_hold_a_fashion_mnist_subfolder(tmp_path):
    write_fashion(tmp_path / "fashion-mnist", "test", n=5)
    assert len(load_dataset("fashion-mnist", "test", root=tmp_path)) == 5


def test_fashion_mnist_found_through_workbench_data_env(tmp_path, no_fashion_elsewhere, monkeypatch):
    write_fashion(tmp_path / "env" / "fashion-mnist", "train", n=7)
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "env"))
    assert len(load_dataset("fashion-mnist")) == 7


def test_fashion_mnist_metadata_and_unofficial_reference_groups(tmp_path):
    ds = load_dataset("fashion-mnist", "train", root=write_fashion(tmp_path, "train"))
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and ds.num_classes == 10
    groups = {ds.reference_group_names[g]: {c for c, gg in zip(ds.classes, ds.reference_groups) if gg == g}
              for g in set(ds.reference_groups)}
    assert groups == {"tops": {"T-shirt/top", "Pullover", "Coat", "Shirt"}, "bottoms+dresses": {"Trouser", "Dress"},
                      "footwear": {"Sandal", "Sneaker", "Ankle boot"}, "bags": {"Bag"}}
    assert "not official" in ds.reference_source
    assert ds.mean == pytest.approx((0.2860,), abs=1e-4) and ds.std == pytest.approx((0.3530,), abs=1e-4)
    assert ds.hflip is True


def test_fashion_mnist_test_split_falls_back_to_the_eval_bundle(tmp_path, no_fashion_elsewhere, monkeypatch):
    monkeypatch.setattr(data, "EVAL_BUNDLE_DIR", write_fashion(tmp_path / "bundle", "test", n=6))
    assert len(load_dataset("fashion-mnist", "test")) == 6
    with pytest.raises(DatasetError):   # the bundle ships the test split only
        load_dataset("fashion-mnist", "train")


def test_eval_bundle_is_located_relative_to_the_package_not_the_cwd():
    repo = Path(data.__file__).resolve().parent.parent
    assert data.EVAL_BUNDLE_DIR == repo / "sample_checkpoints" / "eval_bundle" / "fashion-mnist"


def test_missing_fashion_mnist_lists_every_place_looked_and_how_to_get_it(tmp_path, no_fashion_elsewhere,
                                                                          monkeypatch):
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "envroot"))
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", "test", root=tmp_path / "given")
    msg = str(e.value)
    for place in (tmp_path / "given", tmp_path / "envroot" / "fashion-mnist", tmp_path / "data" / "fashion-mnist",
                  tmp_path / "system-not-installed", tmp_path / "no-bundle"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-root" in msg and "download=True" in msg


def test_truncated_gzip_is_a_clear_error_naming_the_file(tmp_path):
    folder = write_fashion(tmp_path, "train", n=20)
    path = folder / FASHION_FILES["train"][0]
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DatasetError, match="truncated") as e:
        load_dataset("fashion-mnist", "train", root=folder)
    assert str(path) in str(e.value)


def test_wrong_magic_number_is_a_clear_error(tmp_path):
    folder = write_fashion(tmp_path, "train", n=4)
    write_idx(folder / FASHION_FILES["train"][0], np.zeros((4, 28, 28)), magic=2049)   # a label magic
    with pytest.raises(DatasetError, match="magic number 2049.*expected 2051"):
        load_dataset("fashion-mnist", "train", root=folder)


def test_image_label_count_mismatch_is_a_clear_error(tmp_path):
    folder = write_fashion(tmp_path, "train", n=6, labels_n=5)
    with pytest.raises(DatasetError, match="6 images but .* 5 labels"):
        load_dataset("fashion-mnist", "train", root=folder)


def test_idx_header_disagreeing_with_the_data_length_is_a_clear_error(tmp_path):
    folder = write_fashion(tmp_path, "train", n=3)
    raw = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (3, 28, 28)) + bytes(100)
    (folder / FASHION_FILES["train"][0]).write_bytes(gzip.compress(raw))
    with pytest.raises(DatasetError, match="header says 3 x 28 x 28"):
        load_dataset("fashion-mnist", "train", root=folder)


def test_an_idx_gz_is_decompressed_only_as_far_as_its_header_allows(tmp_path):
    import resource

    folder = write_fashion(tmp_path, "train", n=3)
    head = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (3, 28, 28))
    with gzip.open(folder / FASHION_FILES["train"][0], "wb") as f:      # 256 MB of zeros in a 250 KB file
        f.write(head)
        for _ in range(64):
            f.write(bytes(4 << 20))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DatasetError, match="header says 3 x 28 x 28 = 2352 bytes of data, but the file holds more"):
        load_dataset("fashion-mnist", "train", root=folder)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000      # KB: never inflated
    huge = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (10**6, 1000, 1000))
    (folder / FASHION_FILES["train"][0]).write_bytes(gzip.compress(huge))
    with pytest.raises(DatasetError, match="announces 1000000000000 bytes"):
        load_dataset("fashion-mnist", "train", root=folder)


def test_real_fashion_mnist_from_the_debian_package():
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not folder.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{folder} missing on CI: the CI script installs dataset-fashion-mnist")
        pytest.skip(f"{folder} missing (apt-get install dataset-fashion-mnist)")
    train = load_dataset("fashion-mnist", "train", root=folder)
    test = load_dataset("fashion-mnist", "test", root=folder)
    assert (len(train), len(test)) == (60000, 10000) and train.image_shape == (1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    mean, std = data.channel_stats(train.images)
    assert mean == pytest.approx(train.mean, abs=1e-3) and std == pytest.approx(train.std, abs=1e-3)


# ----------------------------------------------------------------------------- CIFAR (pickles)

def test_cifar10_reads_the_official_pickle_layout(tmp_path):
    write_cifar10(tmp_path)
    train, test = load_dataset("cifar10", "train", root=tmp_path), load_dataset("cifar10", "test", root=tmp_path)
    assert len(train) == 15 and len(test) == 4 and train.image_shape == (3, 32, 32)
    assert test.labels.tolist() == [0, 1, 2, 9] and train.classes[1] == "automobile"
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())["data"]
    assert torch.equal(test.images[2], torch.from_numpy(raw[2].reshape(3, 32, 32)))   # CHW, R plane first
    assert train.reference_groups is None and train.hflip is True
    assert train.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=1e-4)


def test_cifar100_reads_fine_labels_and_official_coarse_groups(tmp_path):
    folder = tmp_path / "cifar100" / "cifar-100-python"   # root/<name>/<official folder> is searched too
    fine = [0, 1, 2, 3, 3, 2]
    write_pickle(folder / "meta", {"fine_label_names": ["apple", "bear", "pear", "lion"],
                                   "coarse_label_names": ["fruit", "large carnivores"]})
    coarse_of = [0, 1, 0, 1]
    for split in ("train", "test"):
        write_pickle(folder / split, cifar_batch(6, 1, fine_labels=fine, coarse_labels=[coarse_of[f] for f in fine]))
    ds = load_dataset("cifar100", "test", root=tmp_path)
    assert ds.classes == ["apple", "bear", "pear", "lion"] and ds.labels.tolist() == fine
    assert ds.reference_groups == coarse_of and ds.reference_group_names == ["fruit", "large carnivores"]
    assert ds.reference_source == "CIFAR-100 official coarse labels"


def test_malicious_pickle_is_refused_without_running_its_payload(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    write_pickle(folder / "test_batch", {"data": ShellCommand(f"touch {marker}"), "labels": []})
    with pytest.raises(DatasetError, match="refused to load global .*system") as e:
        load_dataset("cifar10", "test", root=tmp_path)
    assert str(folder / "test_batch") in str(e.value)
    assert not marker.exists()


def test_garbage_pickle_is_a_clear_error(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(X\x04\x00\x00\x00da")   # cut short
    with pytest.raises(DatasetError, match="not a valid CIFAR pickle"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_missing_cifar_lists_places_and_the_official_url(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", "train", root=tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg and "data_batch_1" in msg
    assert "cifar-10-python.tar.gz" in msg and "download=True" in msg


# ----------------------------------------------------------------------------- image folders

def write_png(path: Path, value: int, size=(8, 8), mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, value, value)
    Image.new(mode, size, color).save(path)


def write_imagefolder(root: Path, per_class: int = 5) -> Path:
    """Three classes; every image's grey value is unique, so images can be told apart."""
    for c, cls in enumerate(["dog", "cat", "frog"]):
        for i in range(per_class):
            write_png(root / cls / f"{i}.png", 10 * c * per_class + 10 * i)
    write_png(root / "dog" / "big.png", 250, size=(12, 10), mode="RGB")   # other size and mode
    (root / "hierarchy.json").write_text(json.dumps({"cat": "pets", "dog": "pets", "frog": "wild"}))
    return root


def test_imagefolder_reads_sorted_class_folders_in_one_mode_and_size(tmp_path):
    root = write_imagefolder(tmp_path / "imgs")
    ds = load_dataset(f"imagefolder:{root}", "train")
    assert ds.classes == ["cat", "dog", "frog"] and ds.image_shape == (1, 8, 8)
    assert ds.reference_groups == [0, 0, 1] and ds.reference_group_names == ["pets", "wild"]
    assert ds.reference_source.startswith("hierarchy.json")


def test_imagefolder_split_is_deterministic_disjoint_and_covering(tmp_path):
    root = write_imagefolder(tmp_path / "imgs")
    name = f"imagefolder:{root}"
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    assert torch.equal(train.images, load_dataset(name, "train").images)
    values = lambda ds: {int(v) for v in ds.images[:, 0, 0, 0]}
    assert len(train) + len(test) == 16 and not values(train) & values(test)
    assert set(test.labels.tolist()) == {0, 1, 2}       # every class in the test part
    assert test.mean == train.mean                       # statistics come from the training part


def test_imagefolder_uses_train_and_test_subfolders_when_present(tmp_path):
    write_imagefolder(tmp_path / "imgs" / "train", per_class=3)
    write_png(tmp_path / "imgs" / "test" / "frog" / "0.png", 7)
    ds = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", "test")
    assert len(ds) == 1 and ds.labels.tolist() == [2] and ds.classes == ["cat", "dog", "frog"]


def test_imagefolder_unreadable_image_names_the_file(tmp_path):
    root = write_imagefolder(tmp_path / "imgs")
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="broken.png: cannot read image"):
        load_dataset(f"imagefolder:{root}", "train", test_fraction=0.0)


def test_imagefolder_hierarchy_must_cover_every_class(tmp_path):
    root = write_imagefolder(tmp_path / "imgs")
    (root / "hierarchy.json").write_text(json.dumps({"cat": 0, "dog": 1}))
    with pytest.raises(DatasetError, match=r"hierarchy.json: must map every class folder to a group; "
                                           r"missing \['frog'\]"):
        load_dataset(f"imagefolder:{root}", "train")


def test_the_old_hierarchy_file_name_is_still_read_with_a_deprecation_note(tmp_path):
    root = write_imagefolder(tmp_path / "imgs")
    (root / "hierarchy.json").rename(root / "superclasses.json")
    with pytest.warns(FutureWarning, match="now called hierarchy.json"):
        ds = load_dataset(f"imagefolder:{root}", "train")
    assert ds.reference_groups == [0, 0, 1] and ds.reference_group_names == ["pets", "wild"]
    assert "deprecated name: rename it to hierarchy.json" in ds.reference_source


def test_a_superclass_map_beside_the_class_folders_is_not_misread_as_a_hierarchy(tmp_path):
    root = write_imagefolder(tmp_path / "imgs")
    (root / "hierarchy.json").unlink()
    (root / "superclasses.json").write_text(json.dumps({     # the pipeline's map format, copied here
        "dataset": "imagefolder:imgs", "method": "spectral", "num_groups": 2,
        "classes": {"cat": 0, "dog": 1, "frog": 1}, "groups": ["cat", "dog / frog"]}))
    ds = load_dataset(f"imagefolder:{root}", "train")
    assert ds.reference_groups is None and ds.reference_source is None


# ----------------------------------------------------------------------------- image folder: decode once, cache

@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cache_entries(cache: Path) -> list[Path]:
    return sorted((cache / "imagefolder").glob("*-*"))


def no_decoding(monkeypatch):
    def refuse(*args):
        raise AssertionError("decoded although the cache should have answered")
    monkeypatch.setattr(data, "_decode_chunk", refuse)


def test_imagefolder_decodes_once_then_both_splits_come_from_the_cache(tmp_path, cache, monkeypatch):
    name = f"imagefolder:{write_imagefolder(tmp_path / 'imgs')}"
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    (entry,) = cache_entries(cache)
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "test.npy", "train.npy"]   # no pickle
    no_decoding(monkeypatch)
    for cold in (train, test):
        warm = load_dataset(name, cold.split)
        assert torch.equal(warm.images, cold.images) and torch.equal(warm.labels, cold.labels)
        assert (warm.mean, warm.std, warm.classes) == (cold.mean, cold.std, cold.classes)
        assert warm.reference_groups == cold.reference_groups


def test_a_changed_file_list_or_mtime_decodes_again_and_replaces_the_entry(tmp_path, cache):
    root = write_imagefolder(tmp_path / "imgs")
    name = f"imagefolder:{root}"
    first = load_dataset(name, "train", test_fraction=0.0)
    write_png(root / "cat" / "0.png", 123)                        # same name, new content and mtime
    os.utime(root / "cat" / "0.png", ns=(1, 2))
    assert 123 in load_dataset(name, "train", test_fraction=0.0).images[:, 0, 0, 0].tolist()
    write_png(root / "cat" / "new.png", 77)
    again = load_dataset(name, "train", test_fraction=0.0)
    assert len(again) == len(first) + 1 and 77 in again.images[:, 0, 0, 0].tolist()
    assert len(cache_entries(cache)) == 1                         # older entries of the folder are dropped


def test_options_that_change_the_images_have_their_own_entry(tmp_path, cache):
    name = f"imagefolder:{write_imagefolder(tmp_path / 'imgs')}"
    assert load_dataset(name, "train", size=4).image_shape == (1, 4, 4)
    assert load_dataset(name, "train").image_shape == (1, 8, 8)
    assert load_dataset(name, "train", size=4).image_shape == (1, 4, 4)


def test_a_damaged_or_unwritable_cache_only_costs_a_decode(tmp_path, cache, monkeypatch):
    name = f"imagefolder:{write_imagefolder(tmp_path / 'imgs')}"
    good = load_dataset(name, "train")
    (entry,) = cache_entries(cache)
    (entry / "train.npy").write_bytes(b"\x93NUMPY truncated")
    assert torch.equal(load_dataset(name, "train").images, good.images)
    (entry / "meta.json").write_text("{not json")
    assert torch.equal(load_dataset(name, "train").images, good.images)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("WORKBENCH_CACHE", str(blocked))          # cannot hold a folder
    assert torch.equal(load_dataset(name, "train").images, good.images)


def test_parallel_decoding_equals_serial_and_still_names_a_bad_file(tmp_path, cache, monkeypatch):
    root = write_imagefolder(tmp_path / "imgs", per_class=6)
    serial = load_dataset(f"imagefolder:{root}", "train")
    monkeypatch.setattr(data, "PARALLEL_MIN_IMAGES", 0)
    monkeypatch.setattr(data, "DECODE_CHUNK", 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)   # two workers on any machine
    files = sorted(root.glob("*/*.png"))
    images = data._decode_images(files, "L", (8, 8))
    assert data._decode_workers(len(files)) == 2
    assert torch.equal(torch.from_numpy(images), torch.from_numpy(data._decode_chunk(files, "L", (8, 8))))
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "other-cache"))
    assert torch.equal(load_dataset(f"imagefolder:{root}", "train").images, serial.images)
    (root / "frog" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="broken.png: cannot read image"):
        data._decode_images(sorted(root.glob("*/*.png")), "L", (8, 8))


def test_imagefolder_test_split_uses_the_exact_training_statistics(tmp_path, cache):
    """More than 500 training images: a sample of them (the old way) would shift the statistics."""
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        for i in range(330):
            Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8), "L").save(root / cls / f"{i}.png")
    train, test = (load_dataset(f"imagefolder:{root}", s) for s in ("train", "test"))
    assert len(train) > 500
    assert test.mean == train.mean == data.channel_stats(train.images)[0]
    assert test.std == train.std == data.channel_stats(train.images)[1]


def test_channel_stats_is_exact_and_handles_constant_channels():
    x = torch.randint(0, 256, (300, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = x.transpose(0, 1).reshape(3, -1).double() / 255
    mean, std = data.channel_stats(x)
    assert mean == pytest.approx(ref.mean(1).tolist(), abs=6e-5)
    assert std == pytest.approx(ref.std(1, unbiased=False).tolist(), abs=6e-5)
    assert data.channel_stats(x.numpy()) == (mean, std)                        # arrays too
    assert data.channel_stats(torch.full((4, 1, 2, 2), 51, dtype=torch.uint8)) == ((0.2,), (1.0,))
    with pytest.raises(ValueError, match="uint8"):
        data.channel_stats(x.float())


# ----------------------------------------------------------------------------- names, splits, transforms

def test_unknown_dataset_name_lists_the_valid_names():
    with pytest.raises(DatasetError) as e:
        load_dataset("imagenet")
    assert all(n in str(e.value) for n in ("fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH", "synthetic"))
    assert issubclass(DatasetError, ValueError)


def test_heldout_split_is_deterministic_disjoint_covering_and_sorted():
    train, held = heldout_split(1000, 0.1, seed=3)
    again_train, again_held = heldout_split(1000, 0.1, seed=3)
    assert torch.equal(train, again_train) and torch.equal(held, again_held)
    assert len(held) == 100 and train.dtype == held.dtype == torch.int64
    assert torch.equal(torch.sort(torch.cat([train, held])).values, torch.arange(1000))
    assert torch.equal(held, held.sort().values) and torch.equal(train, train.sort().values)
    assert not torch.equal(held, heldout_split(1000, 0.1, seed=4)[1])


def test_heldout_split_stratified_by_labels_takes_the_fraction_of_every_class():
    labels = torch.arange(300) % 3
    _, held = heldout_split(300, 0.1, seed=0, labels=labels)
    assert torch.bincount(labels[held]).tolist() == [10, 10, 10]


def test_subset_keeps_the_metadata(tmp_path):
    ds = load_dataset("synthetic", num_train=64, num_test=16)
    sub = ds.subset(torch.tensor([3, 1]))
    assert len(sub) == 2 and torch.equal(sub.images[0], ds.images[3])
    assert sub.classes == ds.classes and sub.reference_groups == ds.reference_groups and sub.mean == ds.mean


def test_normalize_maps_uint8_to_standardised_float32():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    out = normalize(x, (0.5,), (0.25,))
    assert out.dtype == torch.float32 and out.flatten().tolist() == pytest.approx([-2.0, 2.0])
    with pytest.raises(ValueError):
        normalize(x.float(), (0.5,), (0.25,))


def test_augment_keeps_shape_and_dtype_and_is_reproducible():
    x = torch.randn(16, 3, 32, 32)
    a = augment(x, True, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, augment(x, True, torch.Generator().manual_seed(0)))


def test_augment_without_hflip_never_flips():
    x = torch.randn(64, 1, 8, 8)
    for seed in range(5):
        assert torch.equal(augment(x, False, torch.Generator().manual_seed(seed), pad=0), x)


def test_augment_with_hflip_flips_some_images_and_keeps_the_others():
    x = torch.randn(64, 1, 8, 8)
    out = augment(x, True, torch.Generator().manual_seed(0), pad=0)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped | kept).all()) and 0 < int(flipped.sum()) < 64


def test_augment_crops_a_window_of_the_edge_padded_image():
    x = torch.rand(32, 1, 6, 6) + 1
    out = augment(x, False, torch.Generator().manual_seed(1), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    offsets = set()
    for o, p in zip(out, padded):
        match = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(o, p[:, dy:dy + 6, dx:dx + 6])]
        assert match
        offsets.add(match[0])
    assert len(offsets) > 5


def test_augment_border_repeats_the_image_edge_not_a_constant():
    """A crop's new border is the image's own background (edge pixels), never the mean grey of zero
    padding on a normalised batch, nor black on a dataset whose background is not black."""
    x = torch.full((64, 1, 6, 6), 0.7)                       # a flat "background" image
    out = augment(x, False, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(out, x)


def test_training_augmentation_choice_reaches_the_batch():
    from workbench.evaluate import to_batch

    ds = load_dataset("synthetic", num_train=64)
    idx = torch.arange(64)
    plain, _ = to_batch(ds, idx, "cpu")
    none, _ = to_batch(ds, idx, "cpu", torch.Generator().manual_seed(0), "none")
    flip, _ = to_batch(ds, idx, "cpu", torch.Generator().manual_seed(0), "flip")
    crop, _ = to_batch(ds, idx, "cpu", torch.Generator().manual_seed(0), "crop-flip")
    assert torch.equal(none, plain)
    flipped = [torch.equal(f, p.flip(-1)) and not torch.equal(f, p) for f, p in zip(flip, plain)]
    assert all(torch.equal(f, p) or fl for f, p, fl in zip(flip, plain, flipped)) and any(flipped)
    assert not torch.equal(crop, plain) and not torch.equal(crop, flip)


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_by_seed_and_splits_differ():
    a, b = load_dataset("synthetic", seed=1, num_train=200), load_dataset("synthetic", seed=1, num_train=200)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, load_dataset("synthetic", seed=2, num_train=200).images)
    test = load_dataset("synthetic", "test", seed=1, num_train=200, num_test=200)
    assert not torch.equal(a.images, test.images) and test.mean == a.mean


def test_synthetic_default_shape_classes_and_designed_groups():
    ds = load_dataset("synthetic", "test")
    assert len(ds) == 1600 and ds.image_shape == (1, 28, 28) and ds.num_classes == 16
    assert ds.reference_groups == [g for g in range(4) for _ in range(4)]
    assert ds.reference_source == "synthetic: designed groups" and len(ds.reference_group_names) == 4
    assert len(set(ds.classes)) == 16 and torch.bincount(ds.labels).tolist() == [100] * 16


def test_synthetic_class_and_group_counts_are_configurable():
    ds = load_dataset("synthetic", num_train=120, num_test=12, num_classes=12, num_groups=3)
    assert ds.num_classes == 12 and sorted(set(ds.reference_groups)) == [0, 1, 2]
    with pytest.raises(DatasetError, match="num_groups"):
        load_dataset("synthetic", num_groups=9)


def test_synthetic_classifier_errors_stay_within_the_designed_groups():
    """The designed property: a linear model beats chance by far and confuses only classes of one group."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits   # one BLAS thread: much faster than contended threads here

    train = load_dataset("synthetic", "train", num_train=960, num_test=480)
    test = load_dataset("synthetic", "test", num_train=960, num_test=480)
    pool = lambda ds: ds.images.float().reshape(len(ds), 7, 4, 7, 4).mean((2, 4)).reshape(len(ds), -1).numpy() / 255
    with threadpool_limits(1):
        pred = LogisticRegression(max_iter=200, C=0.05).fit(pool(train), train.labels.numpy()).predict(pool(test))
    truth, groups = test.labels.numpy(), np.array(test.reference_groups)
    wrong = pred != truth
    assert (~wrong).mean() > 0.4                                   # chance is 1/16
    assert (groups[pred[wrong]] == groups[truth[wrong]]).mean() > 0.85
