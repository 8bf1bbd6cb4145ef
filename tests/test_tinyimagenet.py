"""Tiny ImageNet: the official layout read from an archive built here, the download command, WordNet groups."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from workbench import tinyimagenet as tin
from workbench.data import DatasetError, load_dataset
from workbench.wordnet import hypernym_paths, read_data_noun, read_table, wordnet_groups

CLASSES = {"n01443537": "goldfish, Carassius auratus", "n01641577": "bullfrog, Rana catesbeiana",
           "n02795169": "barrel, cask", "n03400231": "frying pan, frypan, skillet"}


def _write_layout(root: Path, size: int = 16, n_train: int = 3, n_val: int = 2) -> Path:
    """A miniature tiny-imagenet-200 folder: 4 classes (real wnids), solid-colour JPEGs."""
    d = root / tin.FOLDER
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("".join(w + "\n" for w in CLASSES))
    (d / "words.txt").write_text("n00000001\tsomething else\n" + "".join(f"{w}\t{n}\n" for w, n in CLASSES.items()))
    ann = []
    for i, w in enumerate(CLASSES):
        (d / "train" / w / "images").mkdir(parents=True)
        for j in range(n_train):
            Image.new("RGB", (size, size), (60 * i, 10 * j, 200)).save(d / "train" / w / "images" / f"{w}_{j}.JPEG")
        for j in range(n_val):
            name = f"val_{i * n_val + j}.JPEG"
            Image.new("RGB", (size, size), (60 * i, 0, 0)).save(d / "val" / "images" / name)
            ann.append(f"{name}\t{w}\t0\t0\t{size - 1}\t{size - 1}\n")
    (d / "val" / "val_annotations.txt").write_text("".join(ann))
    return d


def _zip(folder: Path, archive: Path, extra: dict | None = None) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(folder.rglob("*")):
            z.write(f, f.relative_to(folder.parent))
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return archive


def test_the_official_layout_reads_as_train_and_test_splits_with_class_names(tmp_path):
    _write_layout(tmp_path)
    train = load_dataset("tiny-imagenet", "train", root=tmp_path)
    test = load_dataset("tiny-imagenet", "test", root=tmp_path, size=8)
    assert train.images.shape == (12, 3, 16, 16) and test.images.shape == (8, 3, 8, 8)
    assert train.classes == ["goldfish", "bullfrog", "barrel", "frying pan"]
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert train.mean == pytest.approx(test.mean, abs=0.02)        # test normalised with training statistics
    assert "WordNet" in train.reference_source
    assert sorted(train.reference_groups) == [0, 1, 2, 3]         # k = min(10, classes) groups


def test_a_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="download tiny-imagenet"):
        load_dataset("tiny-imagenet", root=tmp_path / "nowhere")


def test_a_broken_layout_names_the_file(tmp_path):
    d = _write_layout(tmp_path)
    (d / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="val_annotations.txt:1"):
        load_dataset("tiny-imagenet", "test", root=tmp_path)


def test_download_checks_the_archive_and_extracts_it(tmp_path):
    src = _write_layout(tmp_path / "src")
    archive = _zip(src, tmp_path / "tiny.zip")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(DatasetError, match="wrong MD5"):
        tin.download(tmp_path / "bad", url=archive.as_uri(), md5="0" * 32)
    assert not list((tmp_path / "bad").glob("*.part"))               # nothing half-written left behind
    folder = tin.download(tmp_path / "data", url=archive.as_uri(), md5=md5)
    assert (folder / "wnids.txt").is_file()
    assert len(load_dataset("tiny-imagenet", "test", root=tmp_path / "data")) == 8


def test_an_archive_member_outside_the_destination_is_refused(tmp_path):
    src = _write_layout(tmp_path / "src")
    archive = _zip(src, tmp_path / "evil.zip", extra={"../../escaped.txt": "x"})
    with pytest.raises(DatasetError, match="outside"):
        tin.extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_an_archive_that_would_unpack_past_the_bound_is_refused_before_writing(tmp_path, monkeypatch):
    src = _write_layout(tmp_path / "src")
    archive = _zip(src, tmp_path / "big.zip", extra={"tiny-imagenet-200/filler.bin": "0" * 4096})
    monkeypatch.setattr(tin, "MAX_EXTRACTED_BYTES", 2048)
    with pytest.raises(DatasetError, match="once unpacked"):
        tin.extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_disk_that_fills_while_unpacking_leaves_no_partial_dataset(tmp_path, monkeypatch):
    import errno
    import zipfile

    src = _write_layout(tmp_path / "src")
    archive = _zip(src, tmp_path / "tiny.zip")
    real = zipfile.ZipFile.extractall

    def fill_the_disk(self, path=None, *args, **kwargs):
        real(self, path, members=self.namelist()[:3])                # a few files land, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", fill_the_disk)
    with pytest.raises(DatasetError, match="No space left on device.*nothing was kept"):
        tin.extract(archive, tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []                # no tree, no staging folder
    monkeypatch.setattr(zipfile.ZipFile, "extractall", real)        # space freed: the next run unpacks it all
    assert (tin.extract(archive, tmp_path / "data") / "wnids.txt").is_file()
    assert len(load_dataset("tiny-imagenet", "test", root=tmp_path / "data")) == 8


def test_the_download_command_prints_the_terms(tmp_path, capsys, monkeypatch):
    from workbench import data

    src = _write_layout(tmp_path / "src")
    archive = _zip(src, tmp_path / "tiny.zip")
    monkeypatch.setattr(tin, "URL", archive.as_uri())
    monkeypatch.setattr(tin, "MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    data.main(["download", "tiny-imagenet", "--root", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert "non-commercial" in out and (tmp_path / "d" / tin.FOLDER / "wnids.txt").is_file()


def test_the_shipped_wordnet_table_covers_the_200_classes_with_root_first_paths():
    table = read_table()
    assert len(table) == 200
    for entry in table.values():
        for path in entry["paths"]:
            assert path[0] == ("n00001740", "entity")


def test_wordnet_groups_are_exactly_k_and_keep_close_synsets_together():
    table = read_table()
    wnids = list(table)
    groups, names = wordnet_groups([table[w]["paths"] for w in wnids], 10)
    assert len(set(groups)) == 10 and len(names) == 10 and len(set(names)) == 10
    by = dict(zip(wnids, groups))
    assert by["n02085620"] == by["n02094433"]        # Chihuahua and Yorkshire terrier: both dogs
    assert by["n02085620"] != by["n03400231"]        # a dog and a frying pan are not
    with pytest.raises(ValueError):
        wordnet_groups([table[w]["paths"] for w in wnids], 0)


def test_paths_are_derived_from_data_noun_hypernym_pointers(tmp_path):
    # a 4-synset data.noun: c has two parents (a hypernym and an instance hypernym)
    lines = ["  1 licence header line\n",
             "00000001 03 n 01 root 0 000 | the root\n",
             "00000002 03 n 01 a 0 001 @ 00000001 n 0000 | a\n",
             "00000003 03 n 01 b 0 001 @ 00000001 n 0000 | b\n",
             "00000004 03 n 02 c 0 c_too 0 003 @ 00000002 n 0000 @i 00000003 n 0000 ~ 00000001 n 0000 | c\n"]
    (tmp_path / "data.noun").write_text("".join(lines))
    db = read_data_noun(tmp_path / "data.noun")
    paths = hypernym_paths("n00000004", db)
    assert [[w for w, _ in p] for p in paths] == [["n00000001", "n00000002", "n00000004"],
                                                 ["n00000001", "n00000003", "n00000004"]]
    with pytest.raises(ValueError):
        hypernym_paths("n12345678", db)
