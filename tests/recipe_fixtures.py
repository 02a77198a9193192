"""Running the shipped VOC/COCO recipes end to end in tests: tiny VOC- and COCO-layout directories on disk,
painted by the synthetic generator (its textures stand in for the real classes) for the real converters, the
overrides that shrink a recipe's model and workers to a CPU test, and the checks every finished chain must pass."""

from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from weaktr import storage
from weaktr.data.synthetic import SyntheticSpec, iter_synthetic
from weaktr.data.voc import save_palette_png

TINY_ON_CPU = [
    "data.loader_workers=0",
    "model.pretrained=false", "model.img_size=64", "model.embed_dim=64", "model.depth=2", "model.num_heads=2",
    "model.reduction=2", "model.feat_reduction=4", "model.drop_path_rate=0.0",
    "train.epochs=2", "train.batch_size=8", "train.num_workers=1", "train.use_gpu=false", "train.cpus_per_worker=1",
    "train.img_size=64", "train.warmup_epochs=0", "train.cam_eval.samples=4",
    "pseudo.cam_gpus_per_actor=0", "pseudo.cam_actors=1", "pseudo.crf_actors=1", "pseudo.batch_size=8",
    "pseudo.overlay_samples=2",
    "seg_model.pretrained=false", "seg_model.img_size=64", "seg_model.embed_dim=64", "seg_model.depth=2",
    "seg_model.num_heads=2", "seg_model.d_model=64",
    "seg_train.epochs=1", "seg_train.num_workers=1", "seg_train.use_gpu=false", "seg_train.cpus_per_worker=1",
    "seg_train.base_size=72", "seg_train.crop_size=64", "seg_train.clip_patch_size=32",
    "eval.short_side=64", "eval.window=64", "eval.stride=48", "eval.actors=1", "eval.gpus_per_actor=0",
]

# The VOC recipe's whole pipeline as tests/test_pipeline.py runs it on the shared head and tests/test_multinode.py on
# the simulated cluster (with the former as its single-node reference): two Ray Train workers in each phase, so that
# on a cluster each phase has ranks on two nodes. bg_threshold null: the pseudo-labels take the threshold phase 1's
# CAM-mIoU sweep chose for its checkpoint. max_failure_fraction: the damaged shards hold ~20% broken samples, which
# the default 1% would refuse. Overlays go to the first 4 positions, 2 of them damaged.
# Two phase-1 epochs: a node lost after the first checkpoint is lost mid-phase.
VOC_PIPELINE = [*TINY_ON_CPU, "train.epochs=2", "train.num_workers=2", "seg_train.num_workers=2", "run.name=pipe",
                "pseudo.bg_threshold=null", "data.max_failure_fraction=0.5", "pseudo.overlay_samples=4"]
VOC_PIPELINE_DATA = "s3://weaktr-pipeline/voc12"


def write_voc_pipeline_data(tmp_path: Path):
    """The converted VOC-layout fixture of the pipeline tests (16 train_aug images, 8 of them VOC train, 4 val; plus
    the hostile items of add_hostile_voc_items, then damage_shards on train_aug), uploaded to VOC_PIPELINE_DATA on
    the loopback S3 server. Returns (fate, damage, manifest) of add_hostile_voc_items, damage_shards, convert_voc."""
    import boto3

    from weaktr.data.voc import convert_voc

    voc_root, aug_list = write_voc_layout(tmp_path)
    fate = add_hostile_voc_items(voc_root, aug_list)
    # max_side 320 (default 1024) so the oversized image is downscaled without making the test slow.
    manifest = convert_voc(voc_root, tmp_path / "voc12", aug_list=aug_list, samples_per_shard=8, max_side=320)
    damage = damage_shards(manifest.shard_paths("train_aug"))
    bucket = VOC_PIPELINE_DATA.removeprefix("s3://").split("/")[0]
    boto3.client("s3").create_bucket(Bucket=bucket)
    storage.upload_dir(tmp_path / "voc12", VOC_PIPELINE_DATA)
    return fate, damage, manifest


def check_chain(records: dict, cfg, num_train: int, num_classes: int) -> None:
    phase1 = records["phase1"]["metrics"]
    assert len(phase1["history"]) == cfg.train.epochs and all(0 < m["cam_mIoU"] <= 1 for m in phase1["history"])
    assert records["phase1"]["metrics"]["score"] == "cam_mIoU"  # the official checkpoint_best_mIoU choice
    pseudo = records["pseudo"]["metrics"]
    assert pseudo["split"] == cfg.data.train_split and pseudo["num_samples"] == num_train
    assert len(records["phase2"]["metrics"]["history"]) == 1
    for name in ("eval", "eval_crf"):
        report = records["eval"]["metrics"][name]
        assert 0 <= report["miou"] <= 1 and len(report["per_class"]) == num_classes + 1
        assert report["settings"]["ensemble_weight"] == 0.8 and len(report["settings"]["scales"]) == 6


SPEC = SyntheticSpec(num_classes=4, min_size=64, max_size=96, max_objects=2)


def write_voc_layout(tmp_path: Path, num_aug: int = 16, num_train: int = 8, num_val: int = 4) -> tuple[Path, Path]:
    """VOCdevkit/VOC2012 with JPEGImages, SegmentationClass(Aug), ImageSets/Segmentation/{train,val}.txt and an
    SBD-style train_aug list (train is a subset of train_aug, as in VOC). Synthetic class c is VOC class c + 1.
    Returns (VOC root, train_aug list)."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for index, sample in enumerate(iter_synthetic(SPEC, 0, num_aug + num_val)):
        image_id = f"2008_{index:06d}"
        ids.append(image_id)
        Image.fromarray(sample.image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        save_palette_png(root / "SegmentationClass" / f"{image_id}.png", sample.mask)
        Image.fromarray(sample.mask, mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
    aug, val = ids[:num_aug], ids[num_aug:]
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(aug[:num_train]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(val) + "\n")
    aug_list = tmp_path / "train_aug.txt"
    aug_list.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in aug))
    return root, aug_list


def add_hostile_voc_items(root: Path, aug_list: Path) -> dict[str, str]:
    """Add to a ``write_voc_layout`` tree what a real folder of photos holds, in train_aug (and two in val): images
    that cannot be read, masks that do not fit, and readable oddities (1x1, grayscale, CMYK, a 16-bit PNG behind a
    .jpg name, an EXIF-rotated photo with its mask drawn upright, one larger than the converter keeps). Returns
    {id: what must happen to it}: "skipped" (with a reason in failures.jsonl) or "kept"."""
    rng = np.random.default_rng(7)
    sample = next(iter(iter_synthetic(SPEC, 99, 1)))
    image, mask = sample.image, sample.mask  # RGB [H, W, 3], ids [H, W]
    jpegs, masks, fate = root / "JPEGImages", root / "SegmentationClassAug", {}

    def add(image_id: str, what: str, picture=None, id_mask=None, data: bytes | None = None, **save) -> None:
        fate[image_id] = what
        if data is not None:
            (jpegs / f"{image_id}.jpg").write_bytes(data)
        elif picture is not None:
            picture.save(jpegs / f"{image_id}.jpg", **({"format": "JPEG", "quality": 95} | save))
        if id_mask is not None:
            Image.fromarray(id_mask.astype(np.uint8), mode="L").save(masks / f"{image_id}.png")

    whole = Image.fromarray(image)
    encoded = io.BytesIO()
    whole.save(encoded, format="JPEG", quality=95)
    add("hostile_truncated", "skipped", data=encoded.getvalue()[: len(encoded.getvalue()) // 2], id_mask=mask)
    add("hostile_empty", "skipped", data=b"", id_mask=mask)
    add("hostile_noise", "skipped", data=rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(), id_mask=mask)
    add("hostile_missing", "skipped")  # listed, no file
    add("hostile_mask_size", "skipped", whole, mask[:-3])
    add("hostile_mask_id", "skipped", whole, np.where(mask > 0, 30, 0))  # VOC has ids 0..20
    add("hostile_1x1", "kept", Image.fromarray(image[:1, :1]), np.ones((1, 1)))
    add("hostile_gray", "kept", whole.convert("L"), mask)
    add("hostile_cmyk", "kept", whole.convert("CMYK"), mask)
    deep = (np.asarray(whole.convert("L"), dtype=np.uint16) * 257)
    add("hostile_deep", "kept", Image.fromarray(deep), mask, format="PNG")  # 16-bit, behind a .jpg name
    exif = Image.Exif()
    exif[0x0112] = 6  # stored lying on its side; viewers rotate it 90 degrees clockwise upright
    add("hostile_exif", "kept", whole.transpose(Image.Transpose.ROTATE_90), mask, exif=exif.tobytes())
    big = whole.resize((whole.width * 10, whole.height * 10), Image.Resampling.NEAREST)
    add("hostile_large", "kept", big, np.kron(mask, np.ones((10, 10), np.uint8)))
    with open(aug_list, "a") as f:
        f.writelines(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in fate)
    # Two readable oddities in val too, scored by the evaluation (their masks in SegmentationClass).
    for image_id in ("hostile_1x1", "hostile_exif"):
        id_mask = np.asarray(Image.open(masks / f"{image_id}.png"))
        save_palette_png(root / "SegmentationClass" / f"{image_id}.png", id_mask)
    with open(root / "ImageSets/Segmentation/val.txt", "a") as f:
        f.write("hostile_1x1\nhostile_exif\n")
    return fate


def damage_shards(shard_paths: list[str]) -> dict[str, str]:
    """What storage and other tools do to shards after conversion: in the first shard one sample's labels.json
    names a class past the dataset's and another's is gone; a middle shard is cut in the middle. Returns
    {damaged sample key or shard file name: the damage}, in that order, then the keys the cut took (a sample
    whose last file the cut split counts as taken)."""
    with tarfile.open(shard_paths[0]) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    past, unlabelled = sorted({member.name.split(".")[0] for member, _ in members})[:2]
    with tarfile.open(shard_paths[0], "w") as tar:
        for member, data in members:
            if member.name == f"{unlabelled}.labels.json":
                continue
            if member.name == f"{past}.labels.json":
                data = b"[25]"
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    cut = Path(shard_paths[len(shard_paths) // 2])
    with tarfile.open(cut) as tar:
        files = collections.Counter(member.name.split(".")[0] for member in tar.getmembers())
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    whole = collections.Counter()  # per sample, its files that survived the cut complete
    with tarfile.open(cut) as tar:
        try:
            for member in tar:
                if len(tar.extractfile(member).read()) == member.size:
                    whole[member.name.split(".")[0]] += 1
        except (tarfile.ReadError, OSError):  # the cut
            pass
    lost = {key: "in the cut-off half of its shard" for key, count in files.items() if whole[key] < count}
    return {past: "label past the classes", unlabelled: "no labels.json", cut.name: "cut in the middle", **lost}


def write_coco_layout(tmp_path: Path, num_train: int = 16, num_val: int = 4) -> Path:
    """coco/{train,val}2014 + annotations/instances_{split}2014.json; synthetic class c is COCO category
    CATEGORY_IDS[c], each object one instance with an uncompressed-RLE mask. Returns the COCO root."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i, "name": n} for i, n in CATEGORIES]
    samples = iter_synthetic(SPEC, 0, num_train + num_val)
    for split, count, offset in (("train", num_train, 0), ("val", num_val, num_train)):
        (root / f"{split}2014").mkdir(exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            sample = next(samples)
            image_id = offset + index + 1
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            Image.fromarray(sample.image).save(root / f"{split}2014" / name, quality=95)
            h, w = sample.mask.shape
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            for c in sample.labels:
                region = sample.mask == c + 1
                annotations.append({"id": len(annotations) + 1 + 1000 * image_id, "image_id": image_id,
                                    "category_id": CATEGORIES[c][0], "iscrowd": 0, "area": float(region.sum()),
                                    "bbox": [0, 0, w, h], "segmentation": {"counts": _rle(region), "size": [h, w]}})
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    return root


CATEGORIES = [(1, "person"), (3, "car"), (18, "dog"), (90, "toothbrush")]


def _rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: alternating 0-runs and 1-runs over column-major pixels, starting with 0s."""
    flat = mask.T.reshape(-1).astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs
