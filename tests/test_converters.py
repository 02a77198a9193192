"""VOC / COCO / folder converters on small fixture directories built here."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from weaktr.data.coco import coco2014_splits, convert_coco, official_coco_classes
from weaktr.data.folder import convert_folder, read_label_file
from weaktr.data.shards import Manifest
from weaktr.data.stream import iter_samples
from weaktr.data.voc import VOC_CLASSES, convert_voc, read_id_list, save_palette_png, voc_palette


def random_image(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def read_split(manifest: Manifest, split: str) -> dict:
    return {s.key: s for s in iter_samples(manifest.shard_paths(split))}


def decoded(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


# --------------------------------------------------------------------------- VOC


def block_mask(rng, h, w, ids):
    """0 background with one rectangle per id and a 255 outline around each, like VOC."""
    mask = np.zeros((h, w), np.uint8)
    for i, value in enumerate(ids):
        top, left = 2 + 8 * i, 3 + 5 * i
        mask[top : top + 10, left : left + 12] = 255
        mask[top + 1 : top + 9, left + 1 : left + 11] = value
    return mask


@pytest.fixture
def voc_root(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    masks = {
        "2007_000001": [15],  # person
        "2007_000002": [1, 12],  # aeroplane, dog
        "2007_000003": [7],
        "2007_000004": [20, 3],
        "2008_000005": [9],  # only in the SBD aug set
    }
    for image_id, ids in masks.items():
        h, w = rng.integers(40, 60, size=2)
        Image.fromarray(random_image(rng, h, w)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        mask = block_mask(rng, h, w, ids)
        if image_id.startswith("2007"):
            save_palette_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n2007_000002\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000003\n2007_000004\n")
    (tmp_path / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ("2007_000001", "2008_000005"))
    )
    return root, masks


def test_voc_palette_is_the_canonical_colormap():
    palette = voc_palette()
    assert len(palette) == 768
    colours = [tuple(palette[3 * i : 3 * i + 3]) for i in range(256)]
    assert colours[0] == (0, 0, 0) and colours[1] == (128, 0, 0) and colours[15] == (192, 128, 128)
    assert colours[255] == (224, 224, 192)
    assert len(set(colours)) == 256


def test_read_id_list_accepts_both_forms(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("2007_000032\n\n/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n")
    assert read_id_list(path) == ["2007_000032", "2007_000039"]


def test_voc_converter_labels_from_masks(voc_root, tmp_path):
    root, masks = voc_root
    manifest = convert_voc(root, tmp_path / "out", aug_list=tmp_path / "train_aug.txt", samples_per_shard=1)
    assert manifest.classes == list(VOC_CLASSES) and manifest.num_classes == 20
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"train": 2, "val": 2, "train_aug": 2}
    for split in manifest.splits:
        for key, sample in read_split(Manifest.load(tmp_path / "out"), split).items():
            assert sample.labels == sorted(i - 1 for i in masks[key])
            expected_mask = np.array(Image.open(root / "SegmentationClassAug" / f"{key}.png"))
            np.testing.assert_array_equal(sample.mask, expected_mask)
            np.testing.assert_array_equal(sample.image, decoded(root / "JPEGImages" / f"{key}.jpg"))  # bit-exact


def test_voc_converter_cls_labels_override(voc_root, tmp_path):
    root, _ = voc_root
    table = {"2007_000001": np.eye(20)[[4, 5]].sum(0), "2007_000002": np.eye(20)[0]}
    np.save(tmp_path / "cls_labels.npy", table)
    manifest = convert_voc(root, tmp_path / "out", splits=("train",), cls_labels=tmp_path / "cls_labels.npy")
    labels = {k: s.labels for k, s in read_split(manifest, "train").items()}
    assert labels == {"2007_000001": [4, 5], "2007_000002": [0]}


def failures(out) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


def test_voc_converter_skips_bad_items_with_their_reason(voc_root, tmp_path, capsys):
    root, _ = voc_root
    (root / "JPEGImages" / "2007_000003.jpg").write_bytes(b"")  # zero bytes
    np.save(root / "SegmentationClass" / "x.npy", np.zeros(1))
    mask = np.zeros((7, 9), np.uint8)
    mask[2:4, 2:4] = 3
    save_palette_png(root / "SegmentationClass" / "2007_000004.png", mask)  # not the image's size
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000003\n2007_000004\n2007_999999\n")
    manifest = convert_voc(root, tmp_path / "out")
    assert set(read_split(manifest, "train")) == {"2007_000001", "2007_000002"} and "val" in manifest.splits
    assert manifest.splits["val"].num_samples == 0 and manifest.meta["skipped"] == {"train": 0, "val": 3}
    reasons = {f["source"]: f["reason"] for f in failures(tmp_path / "out")}
    assert set(reasons) == {"2007_000003", "2007_000004", "2007_999999"}
    assert "empty file (0 bytes)" in reasons["2007_000003"] and "is (7, 9)" in reasons["2007_000004"]
    assert "listed but missing" in reasons["2007_999999"]
    printed = capsys.readouterr().out  # the summary the converter prints
    assert "voc12/val: 0 samples in 0 shards (0.0 MiB), 3 skipped" in printed and "failures.jsonl" in printed
    with pytest.raises(FileNotFoundError, match="test.txt"):  # a missing split list is the user's mistake: stop
        convert_voc(root, tmp_path / "out2", splits=("test",))
    assert not (tmp_path / "out2" / "manifest.json").exists()


# --------------------------------------------------------------------------- COCO


def uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's run lengths: alternating 0-runs and 1-runs over column-major pixels, starting with 0s."""
    counts, current, run = [], False, 0
    for value in mask.T.reshape(-1):
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    return counts + [run]


@pytest.fixture
def coco_root(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    for split, offset in (("train", 0), ("val", 10)):
        (root / f"{split}2014").mkdir()
        images, annotations = [], []
        for n in range(3):
            image_id = offset + n
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            Image.fromarray(random_image(rng, 30, 40)).save(root / f"{split}2014" / name)
            images.append({"id": image_id, "file_name": name, "height": 30, "width": 40})
        # image 0: a person polygon (a square 5..15) and a crowd of cars as uncompressed RLE
        annotations.append({"id": 1, "image_id": offset, "category_id": 1, "iscrowd": 0, "area": 100.0,
                            "bbox": [5, 5, 10, 10], "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]})
        crowd = np.zeros((30, 40), bool)
        crowd[20:25, 30:38] = True
        counts = uncompressed_rle(crowd)
        annotations.append({"id": 2, "image_id": offset, "category_id": 3, "iscrowd": 1, "area": 40.0,
                            "bbox": [30, 20, 8, 5], "segmentation": {"counts": counts, "size": [30, 40]}})
        # image 1: a toothbrush triangle; image 2: no annotations (skipped)
        annotations.append({"id": 3, "image_id": offset + 1, "category_id": 90, "iscrowd": 0, "area": 50.0,
                            "bbox": [0, 0, 20, 20], "segmentation": [[0, 0, 20, 0, 0, 20]]})
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    return root


def test_coco_converter(coco_root, tmp_path):
    manifest = convert_coco(tmp_path / "out", coco2014_splits(coco_root))
    assert manifest.classes == ["person", "car", "toothbrush"]  # sorted by category id 1, 3, 90
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"train": 2, "val": 2}
    samples = read_split(manifest, "val")
    first, second = samples["COCO_val2014_000000000010"], samples["COCO_val2014_000000000011"]
    assert first.labels == [0, 1] and second.labels == [2]
    assert (first.mask[7:13, 7:13] == 1).all() and (first.mask[20:25, 30:38] == 2).all()
    assert first.mask[0, 39] == 0 and first.mask[28, 2] == 0
    assert (second.mask[2, 2] == 3) and second.mask[25, 35] == 0
    np.testing.assert_array_equal(first.image, decoded(coco_root / "val2014" / "COCO_val2014_000000000010.jpg"))


def test_coco_converter_official_id_layout(coco_root, tmp_path):
    # The official WeakTr COCO layout: 90 classes, index = category id - 1 (ten ids COCO never uses included).
    manifest = convert_coco(tmp_path / "out", coco2014_splits(coco_root), official_ids=True)
    assert len(manifest.classes) == 90 and manifest.classes[0] == "person" and manifest.classes[89] == "toothbrush"
    assert manifest.classes[11] == "street sign" and manifest.classes[2] == "car"
    samples = read_split(manifest, "val")
    first, second = samples["COCO_val2014_000000000010"], samples["COCO_val2014_000000000011"]
    assert first.labels == [0, 2] and second.labels == [89]
    assert (first.mask[7:13, 7:13] == 1).all() and (first.mask[20:25, 30:38] == 3).all()
    assert second.mask[2, 2] == 90  # segmentation class = category id


def test_coco_rle_must_cover_the_image(coco_root, tmp_path):
    path = coco_root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["segmentation"]["counts"] = [5, 5]
    path.write_text(json.dumps(data))
    data["annotations"].append({"id": 9, "image_id": 1, "category_id": 77, "iscrowd": 0, "area": 1.0,
                                "bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 0, 0, 1]]})
    data["annotations"].append({"id": 10, "image_id": 555, "category_id": 1, "iscrowd": 0, "area": 1.0,
                                "bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 0, 0, 1]]})
    path.write_text(json.dumps(data))
    manifest = convert_coco(tmp_path / "out", coco2014_splits(coco_root))
    assert manifest.splits["train"].num_samples == 0 and manifest.splits["val"].num_samples == 2
    reasons = {f["source"]: f["reason"] for f in failures(tmp_path / "out") if f["split"] == "train"}
    assert "RLE covers 10 pixels" in reasons["COCO_train2014_000000000000.jpg"]
    assert "category ids [77]" in reasons["COCO_train2014_000000000001.jpg"]
    assert "image_id 555" in reasons["annotation 10"]


def star_polygon(rng, cx: float, cy: float, radius: float, points: int = 9) -> list[float]:
    """A random star-shaped polygon around (cx, cy): COCO's outlines are rarely convex."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, points))
    radii = radius * rng.uniform(0.5, 1.0, points)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).round(2).reshape(-1).tolist()


def generated_coco(root, rng, num_images: int = 6, height: int = 120, width: int = 160) -> list[int]:
    """A COCO 2014 layout whose images hold every kind of instance COCO has, overlapping: tiny (radius 2.5-9 px),
    thin, large and multi-part polygons, uncompressed RLE (crowds) and compressed RLE. Returns the category ids."""
    from pycocotools import mask as mask_utils

    category_ids = [1, 3, 18, 44, 90]
    categories = [{"id": i, "name": official_coco_classes()[i - 1]} for i in category_ids]
    for split, first_id in (("train", 0), ("val", 100)):  # image ids are unique over COCO's splits
        (root / f"{split}2014").mkdir(parents=True)
        images, annotations = [], []
        for image_id in range(first_id, first_id + num_images):
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            Image.fromarray(random_image(rng, height, width)).save(root / f"{split}2014" / name)
            images.append({"id": image_id, "file_name": name, "height": height, "width": width})
            blob = np.zeros((height, width), bool)
            blob[rng.integers(0, 60):rng.integers(70, height), rng.integers(0, 80):rng.integers(90, width)] = True
            segmentations = [
                [star_polygon(rng, *rng.uniform(10, 110, 2), rng.uniform(2.5, 9))],  # tiny
                [star_polygon(rng, *rng.uniform(10, 110, 2), rng.uniform(2.5, 9))],
                [[10.3, 20.1, 150.7, 24.9, 150.2, 25.6, 10.1, 21.0]],  # thin: a sliver under a pixel wide
                [star_polygon(rng, 80, 60, rng.uniform(40, 70), points=24)],  # large
                [star_polygon(rng, 30, 90, 15), star_polygon(rng, 120, 30, 12)],  # multi-part
                {"counts": uncompressed_rle(blob), "size": [height, width]},  # a crowd
                {"counts": mask_utils.encode(np.asfortranarray(np.roll(blob, 40, axis=1).astype(np.uint8)))[
                    "counts"].decode(), "size": [height, width]},  # compressed
            ]
            for segmentation in segmentations:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": int(rng.choice(category_ids)),
                                    "iscrowd": int(isinstance(segmentation, dict)), "area": 1.0, "bbox": [0, 0, 1, 1],
                                    "segmentation": segmentation})
        rng.shuffle(annotations)  # the file's order is the painting order, whatever the instances' sizes
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    return category_ids


def test_coco_masks_are_pycocotools_painted_in_the_official_order(tmp_path):
    from pycocotools.coco import COCO

    root = tmp_path / "coco"
    category_ids = generated_coco(root, np.random.default_rng(4))
    manifest = convert_coco(tmp_path / "out", coco2014_splits(root))
    samples = read_split(manifest, "val")
    coco = COCO(str(root / "annotations" / "instances_val2014.json"))
    overlapped = 0
    for info in coco.loadImgs(coco.getImgIds()):
        # What the official data/parse_coco.py does: annToMask per instance in the file's order, first one wins.
        expected = np.zeros((info["height"], info["width"]), np.uint8)
        covered = np.zeros_like(expected, dtype=int)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=info["id"])):
            region = coco.annToMask(ann).astype(bool)
            covered += region
            expected[region & (expected == 0)] = category_ids.index(ann["category_id"]) + 1
        mask = samples[info["file_name"][:-4]].mask
        np.testing.assert_array_equal(mask, expected)
        overlapped += int((covered > 1).sum())
    assert overlapped > 1000  # the order was put to the test


def test_official_class_labels_come_through_unchanged(tmp_path):
    from weaktr.cli import main

    root = tmp_path / "coco"
    rng = np.random.default_rng(5)
    category_ids = generated_coco(root, rng, num_images=3)
    class_labels = root / "voc_format" / "class_labels"
    class_labels.mkdir(parents=True)
    written = {}
    for split, first_id in (("train", 0), ("val", 100)):
        for image_id in range(first_id, first_id + 3):
            ids = rng.choice([0, 255, *category_ids], size=(120, 160)).astype(np.uint8)
            written[f"COCO_{split}2014_{image_id:012d}"] = ids
            if image_id != 2:  # one missing: that image is skipped, named
                Image.fromarray(ids).save(class_labels / f"{image_id:012d}.png")  # the official file name
    # The official 90-class layout: class c + 1 is category id c + 1, so the PNGs go into the shards as they are.
    assert main(["convert", "coco", str(root), str(tmp_path / "official"), "--official-ids",
                 "--class-labels", str(class_labels)]) == 0
    official = Manifest.load(tmp_path / "official")
    for split in ("train", "val"):
        for key, sample in read_split(official, split).items():
            np.testing.assert_array_equal(sample.mask, written[key])
    assert official.splits["train"].num_samples == 2
    assert "no class_labels mask" in failures(tmp_path / "official")[0]["reason"]
    # The 80-class layout: the same ids, mapped to class + 1.
    manifest = convert_coco(tmp_path / "out", coco2014_splits(root), class_labels=str(class_labels))
    lookup = np.zeros(256, np.uint8)
    lookup[255] = 255
    lookup[category_ids] = np.arange(1, len(category_ids) + 1)
    for key, sample in read_split(manifest, "val").items():
        np.testing.assert_array_equal(sample.mask, lookup[written[key]])
    # An id that is no category: that image is skipped, naming it.
    bad = written["COCO_val2014_000000000100"].copy()
    bad[0, 0] = 7
    Image.fromarray(bad).save(class_labels / "000000000100.png")
    convert_coco(tmp_path / "out2", coco2014_splits(root), class_labels=str(class_labels))
    assert any("holds category ids [7]" in f["reason"] for f in failures(tmp_path / "out2"))


# --------------------------------------------------------------------------- folder


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    names = ["a.png", "b.jpg", "sub/c.d.png", "e.bmp", "f.png", "g.png"]
    for name in names:
        Image.fromarray(random_image(rng, 20, 24)).save(folder / name)
    masks = tmp_path / "masks"
    (masks / "sub").mkdir(parents=True)
    mask = np.zeros((20, 24), np.uint8)
    mask[5:10, 5:10] = 2
    mask[4, 4:11] = 255
    Image.fromarray(mask, mode="L").save(masks / "sub" / "c.d.png")
    return folder, masks, mask


def test_folder_converter_csv(image_folder, tmp_path):
    folder, masks, mask = image_folder
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,labels\na.png,cat\nb.jpg,dog;cat\nsub/c.d.png,dog\ne.bmp,bird|cat\n")
    manifest = convert_folder(folder, labels, tmp_path / "out", mask_dir=masks)
    assert manifest.classes == ["bird", "cat", "dog"]
    samples = read_split(manifest, "train")
    assert {k: s.labels for k, s in samples.items()} == {"a": [1], "b": [1, 2], "sub_c_d": [2], "e": [0, 1]}
    np.testing.assert_array_equal(samples["sub_c_d"].mask, mask)
    assert samples["a"].mask is None
    for key, name in (("a", "a.png"), ("b", "b.jpg"), ("e", "e.bmp")):
        np.testing.assert_array_equal(samples[key].image, decoded(folder / name))


def test_folder_converter_json_with_val_split(image_folder, tmp_path):
    folder, _, _ = image_folder
    labels = tmp_path / "labels.json"
    table = {"a.png": "cat", "b.jpg": ["dog"], "f.png": ["cat", "dog"], "g.png": "dog"}
    labels.write_text(json.dumps(table))
    manifest = convert_folder(folder, labels, tmp_path / "out", val_fraction=0.5, seed=1)
    train, val = read_split(manifest, "train"), read_split(manifest, "val")
    assert len(train) == len(val) == 2 and not set(train) & set(val)
    assert set(train) | set(val) == {"a", "b", "f", "g"}
    assert read_label_file(labels) == {"a.png": ["cat"], "b.jpg": ["dog"], "f.png": ["cat", "dog"], "g.png": ["dog"]}


def test_non_utf8_file_names_convert(image_folder, tmp_path):
    """A photo named in Latin-1 bytes (not UTF-8), listed so in a Latin-1 label file, and a UTF-8 non-ASCII name:
    both convert, under keys of safe characters."""
    folder, _, _ = image_folder
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")
    shutil.copy(folder / "b.jpg", os.fsdecode(latin1))
    shutil.copy(folder / "b.jpg", folder / "ÿ-été.jpg")
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"caf\xe9.jpg,cat\n" + "ÿ-été.jpg,dog\n".encode())
    manifest = convert_folder(folder, labels, tmp_path / "out")
    assert sorted(read_split(manifest, "train")) == ["_-_t_", "caf_"]
    assert manifest.meta["skipped"] == {"train": 0}


def test_folder_converter_skips_what_a_users_folder_holds(image_folder, tmp_path):
    """Each bad entry is skipped with its reason in failures.jsonl and counted; everything else converts, and no
    partial shard or temporary file is left behind."""
    folder, masks, _ = image_folder
    (folder / "zero.png").write_bytes(b"")
    (folder / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    whole = (folder / "b.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # a truncated JPEG
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(masks / "f.png")  # f.png is 20 x 24
    labels = tmp_path / "labels.csv"
    labels.write_text("a.png,cat\nzero.png,cat\nnoise.jpg,cat\ncut.jpg,cat\nmissing.png,dog\ng.png,\n"
                      "e.bmp,horse\nf.png,dog\nb.jpg,dog\n")
    manifest = convert_folder(folder, labels, tmp_path / "out", mask_dir=masks, classes=["cat", "dog"])
    assert set(read_split(manifest, "train")) == {"a", "b"}
    reasons = {f["source"]: f["reason"] for f in failures(tmp_path / "out")}
    assert set(reasons) == {"zero.png", "noise.jpg", "cut.jpg", "missing.png", "g.png", "e.bmp", "f.png"}
    assert "truncated" in reasons["cut.jpg"].lower() and "UnidentifiedImageError" in reasons["noise.jpg"]
    assert "not found" in reasons["missing.png"] and "no class" in reasons["g.png"]
    assert "['horse'] are not in classes" in reasons["e.bmp"] and "is (5, 5)" in reasons["f.png"]
    assert manifest.meta["skipped"] == {"train": 7}
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]


def test_converters_store_exif_rotated_photos_upright(image_folder, tmp_path):
    """A phone photo whose EXIF says "rotate 90" is stored upright (as `weaktr predict` and every reader sees it),
    so a mask drawn on the upright photo lines up; an unrotated JPEG keeps its bytes."""
    from weaktr.data.images import load_rgb

    folder, masks, _ = image_folder
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :10] = 255  # white on the left as stored; EXIF orientation 6 shows it rotated 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(folder / "phone.jpg", exif=exif, quality=95)
    upright = load_rgb(folder / "phone.jpg")
    assert upright.shape == (30, 20, 3) and upright[:10].mean() > 200  # white on top once rotated
    Image.fromarray(np.ones((30, 20), np.uint8), mode="L").save(masks / "phone.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("phone.jpg,cat\nb.jpg,dog\n")
    manifest = convert_folder(folder, labels, tmp_path / "out", mask_dir=masks)
    samples = read_split(manifest, "train")
    np.testing.assert_array_equal(samples["phone"].image, upright)
    assert samples["phone"].mask.shape == (30, 20)
    raw = {key: member for key, member in _shard_members(manifest)}
    assert raw["b.jpg"] == (folder / "b.jpg").read_bytes() and "phone.png" in raw  # re-encoded upright


def _shard_members(manifest: Manifest):
    import tarfile

    for path in manifest.shard_paths("train"):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                yield member.name, tar.extractfile(member).read()


def test_convert_command_for_each_layout(voc_root, coco_root, image_folder, tmp_path, capsys):
    from weaktr.cli import main

    root, _ = voc_root
    aug_list = str(tmp_path / "train_aug.txt")
    assert main(["convert", "voc", str(root), str(tmp_path / "voc"), "--aug-list", aug_list]) == 0
    voc = Manifest.load(tmp_path / "voc")
    assert {s: i.num_samples for s, i in voc.splits.items()} == {"train": 2, "val": 2, "train_aug": 2}
    assert main(["convert", "coco", str(coco_root), str(tmp_path / "coco"), "--samples-per-shard", "1"]) == 0
    coco = Manifest.load(tmp_path / "coco")
    assert coco.classes == ["person", "car", "toothbrush"] and coco.splits["val"].num_samples == 2
    assert coco.splits["val"].shard_sizes == [1, 1]
    # The polygon, the crowd's RLE and the sparse category ids (1, 3, 90) as the shards hold them.
    first, second = read_split(coco, "val").values()
    assert (first.labels, second.labels) == ([0, 1], [2])
    assert (first.mask[7:13, 7:13] == 1).all() and (first.mask[20:25, 30:38] == 2).all() and second.mask[2, 2] == 3
    folder, masks, _ = image_folder
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"a.png": "cat", "b.jpg": "dog", "f.png": "cat", "g.png": "dog"}))
    assert main(["convert", "folder", str(folder), str(labels), str(tmp_path / "folder"), "--val-fraction", "0.5"]) == 0
    assert Manifest.load(tmp_path / "folder").splits["val"].num_samples == 2
    printed = capsys.readouterr().out
    assert "voc12/train_aug: 2 samples in 1 shards" in printed and "folder/val: 2 samples" in printed
    assert main(["convert", "coco", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "weaktr convert coco: error: COCO split 'train': not found" in capsys.readouterr().err


def test_reading_threads_write_the_same_dataset_as_one(image_folder, tmp_path, capsys):
    """--workers reads ahead in threads; the shards, manifest and failures are byte for byte those of one thread
    (order kept), and the summary says how long it took."""
    from weaktr.cli import main

    folder, masks, _ = image_folder
    labels = tmp_path / "labels.csv"
    labels.write_text("a.png,cat\nb.jpg,dog\nsub/c.d.png,cat\nmissing.png,dog\nf.png,cat\ng.png,dog\n")
    trees = []
    for workers in ("1", "3"):
        out = tmp_path / f"out{workers}"
        assert main(["convert", "folder", str(folder), str(labels), str(out), "--mask-dir", str(masks),
                     "--workers", workers, "--val-fraction", "0.3"]) == 0
        trees.append(dataset_files(out))
    assert trees[0] == trees[1] and len(trees[0][0]) == 2 and b"missing.png" in trees[0][1]
    assert re.search(r"converted in \d+\.\d s \(\d+ images/s\)", capsys.readouterr().out)


def dataset_files(out) -> tuple[dict, bytes, dict]:
    """A converted dataset's shards (name -> bytes), failures.jsonl and manifest (without its root)."""
    manifest = json.loads((out / "manifest.json").read_text()) | {"root": None}
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}, (out / "failures.jsonl").read_bytes(), manifest


def test_library_messages_reach_the_console_at_the_level_asked(coco_root, tmp_path):
    """``python -m weaktr`` sets logging up: the converter's INFO line about images without annotations is on the
    console (it used to vanish: no handler, no level), and ``-q`` keeps only warnings and errors."""
    import subprocess
    import sys

    def console(*flags: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "weaktr", *flags, "convert", "coco", str(coco_root),
                               str(tmp_path / f"out{len(flags)}")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    left_out = "instances_val2014.json: left out 1 images without annotations"
    assert f"INFO weaktr.data.coco: {coco_root}/annotations/{left_out}" in console()
    quiet = console("-q")
    assert left_out not in quiet and "coco14/val: 2 samples" in quiet  # the command's own summary stays


def test_convert_on_ray_writes_the_dataset_one_thread_writes(coco_root, tmp_path, monkeypatch, ray_session, capsys):
    """--ray reads in Ray tasks of the connected cluster (one image per task here, so several are in flight):
    the shards, failures and manifest are byte for byte those of one thread, downscaling and a skipped image
    included."""
    from ray.util.state import list_tasks

    from weaktr.cli import main
    from weaktr.data import convert

    (coco_root / "train2014" / "COCO_train2014_000000000001.jpg").unlink()
    monkeypatch.setattr(convert, "RAY_BATCH", 1)
    trees = []
    for how in (["--workers", "1"], ["--ray"]):
        out = tmp_path / how[0]
        assert main(["convert", "coco", str(coco_root), str(out), "--max-side", "20", *how]) == 0
        trees.append(dataset_files(out))
    assert trees[0] == trees[1] and b"listed in" in trees[0][1]
    assert trees[0][2]["meta"]["downscaled"] == {"train": 1, "val": 2}
    assert "reading in Ray tasks: 4 CPUs on 1 node(s) now" in capsys.readouterr().out  # the shared head's
    for _ in range(50):  # the workers report their tasks' states to the head every second
        tasks = list_tasks(filters=[("func_or_class_name", "=", "_attempt_batch")], raise_on_missing_output=False)
        if len(tasks) >= 4 and {t.state for t in tasks} == {"FINISHED"}:
            break
        time.sleep(0.2)
    assert len(tasks) == 4 and {t.state for t in tasks} == {"FINISHED"}  # 1 + 2 images read, 1 missing
