"""The ``weaktr`` command.

    weaktr predict --checkpoint CKPT IMAGES_OR_FOLDERS... --out DIR [--scales 1.0 0.75 --no-flip --crf --crf-backend B]
    weaktr import-official cam|seg SRC OUT --config CFG [--classes FILE|voc|coco] [--set KEY=VALUE ...]
    weaktr pipeline --config CFG [--resume | --from STAGE] [--set KEY=VALUE ...]
    weaktr pretrain --config CFG [--check] [--set KEY=VALUE ...]
    weaktr convert voc VOC2012_ROOT OUT [--aug-list F] [--aug-mask-dir D] [--cls-labels F] [SIZES]
    weaktr convert coco COCO_ROOT OUT [--official-ids] [--class-labels DIR] [SIZES]
    weaktr convert folder IMAGES LABELS OUT [--mask-dir D] [--val-fraction F] [SIZES]
        SIZES: [--max-side PX] [--samples-per-shard N] [--workers N | --ray]

``predict`` labels any images with a phase-2 checkpoint: for each it writes ``{name}.png`` (dataset ids as a
VOC-palette PNG: 0 background, c+1 for class c) and ``{name}_overlay.jpg`` (the colours blended over the image).
Images of any size and mode are accepted (grayscale, RGBA, CMYK, palette... are converted to RGB) and EXIF
orientation is applied, so masks line up with the image as viewers show it. Unreadable files are reported and
skipped; the exit code is then 1.

``convert`` writes a dataset of shards from the standard VOC / COCO layouts or a labelled folder (the
``weaktr.data`` converters): unreadable items are skipped with their reason in ``OUT/failures.jsonl``, images
longer than ``--max-side`` are stored downscaled, and a summary of both is printed. OUT may be a bucket
(``s3://…``, ``gs://…``): the dataset is written to a temporary directory here, then uploaded. Images are
read in ``--workers`` threads, or with ``--ray`` in Ray tasks over a cluster's nodes while this process writes
the shards.

``import-official`` turns a checkpoint of the official WeakTr code into a weaktr checkpoint directory
(``weaktr.official``): the architecture from the config's ``model`` / ``seg_model`` section, the class names from
``--classes`` (a file with one name per line, or the built-in ``voc`` / ``coco`` lists; COCO's is the official
90-class layout) or else from the config's dataset.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from weaktr import storage
from weaktr.crf import BACKENDS, resolve_backend
from weaktr.data.convert import CONVERT_WORKERS
from weaktr.data.images import load_rgb
from weaktr.data.shards import MAX_SIDE, SAMPLES_PER_SHARD
from weaktr.logs import add_verbosity_flags, configure_from_args

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def collect_images(inputs: Sequence[str]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(image path, output stem relative to --out) for every input file and every image file under input folders;
    plus the inputs that do not exist."""
    found, missing = [], []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
                found.append((file, file.relative_to(path).with_suffix("")))
        elif path.is_file():
            found.append((path, Path(path.stem)))
        else:
            missing.append(raw)
    # Two inputs with the same name (a.jpg, a.png, other/a.jpg) must not overwrite each other's outputs.
    seen: dict[Path, int] = {}
    unique = []
    for file, stem in found:
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        unique.append((file, stem if count == 0 else stem.with_name(f"{stem.name}_{count}")))
    return unique, missing


def predict_command(args: argparse.Namespace) -> int:
    import torch

    from weaktr.checkpoint import CheckpointMismatch
    from weaktr.config import EvalConfig, from_dict
    from weaktr.data.voc import overlay, save_palette_png, voc_palette
    from weaktr.evaluate import inference_kwargs, load_segmenter, predict_labels

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, ckpt = load_segmenter(args.checkpoint, device)
    except (CheckpointMismatch, FileNotFoundError) as err:
        print(f"weaktr predict: error: {err}", file=sys.stderr)
        return 2
    patch = model.patch_size[0]
    if args.window % patch or not 0 < args.stride <= args.window:
        print(f"weaktr predict: error: need --window a multiple of the patch size {patch} and "
              f"0 < --stride <= --window, got {args.window}, {args.stride}", file=sys.stderr)
        return 2
    names = ["background", *ckpt["classes"]]
    images, missing = collect_images(args.inputs)
    for raw in missing:
        print(f"skipped {raw}: no such file or directory", file=sys.stderr)
    if not images:
        print("weaktr predict: error: no images found in the inputs", file=sys.stderr)
        return 2

    out = Path(args.out)
    palette = voc_palette()
    # The checkpoint's own evaluation settings (short side, ensemble, CRF kernels), with the command line's
    # scales, flip and window on top.
    eval_cfg = from_dict(ckpt.get("config", {}).get("eval", {}), EvalConfig, "eval.")
    eval_cfg.scales, eval_cfg.flip = args.scales, not args.no_flip
    eval_cfg.window, eval_cfg.stride = args.window, args.stride
    crf = None
    if args.crf:
        crf = eval_cfg.crf_params if args.crf_backend is None else replace(eval_cfg.crf_params,
                                                                           backend=args.crf_backend)
        try:
            crf = resolve_backend(crf)
        except ValueError as err:
            print(f"weaktr predict: error: {err}", file=sys.stderr)
            return 2
    unreadable = 0
    for path, stem in images:
        try:
            image = load_rgb(path)
        except (OSError, UnidentifiedImageError, ValueError) as err:  # truncated, not an image, unsupported mode
            print(f"skipped {path}: cannot read image ({err})", file=sys.stderr)
            unreadable += 1
            continue
        labels = predict_labels(model, image, crf=crf, amp=True, **inference_kwargs(eval_cfg))  # [H, W] dataset ids
        (out / stem).parent.mkdir(parents=True, exist_ok=True)
        mask_path = out / f"{stem}.png"
        save_palette_png(mask_path, labels)
        Image.fromarray(overlay(image, labels, palette)).save(out / f"{stem}_overlay.jpg", quality=90)
        present = [names[i] for i in np.unique(labels) if i > 0]
        print(f"{path} -> {mask_path} ({image.shape[1]}x{image.shape[0]}; {', '.join(present) or 'background only'})")
    print(f"{len(images) - unreadable} of {len(images) + len(missing)} inputs labelled into {out}")
    return 1 if unreadable or missing else 0


def import_official_command(args: argparse.Namespace) -> int:
    from weaktr.checkpoint import CheckpointMismatch
    from weaktr.config import ConfigError, load_config
    from weaktr.official import import_official

    prog = "weaktr import-official"
    try:
        cfg = load_config(args.config, args.overrides)
        classes = resolve_classes(args.classes, cfg)
        out = import_official(args.kind, args.src, args.out, cfg, classes)
    except (ConfigError, CheckpointMismatch, FileNotFoundError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"imported {args.src} ({args.kind}, {len(classes)} classes) -> {out}")
    return 0


def pretrain_command(args: argparse.Namespace) -> int:
    from weaktr.config import ConfigError, load_config
    from weaktr.pretrain import RECORD_NAME, WEIGHTS_NAME, check_pretrained, pretrain

    prog = "weaktr pretrain"
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:
            print(check_pretrained(cfg))
            return 0
        record = pretrain(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    out = cfg.pretrain.out
    loss = f", final loss {record['history'][-1]['loss']:.4f}" if record["history"] else ""
    print(f"pretrained {cfg.model.backbone} ({record['steps']} steps{loss}, {record['seconds']:.0f} s) -> "
          f"{out}/{WEIGHTS_NAME} (record: {out}/{RECORD_NAME}); load it with model.weights_path / "
          f"seg_model.weights_path")
    return 0


def resolve_classes(spec: Optional[str], cfg) -> list[str]:
    """Class names from ``--classes``: "voc", "coco" (the official 90), a file of names, or (None) the dataset of
    ``cfg.data.root``."""
    from weaktr.data.coco import official_coco_classes
    from weaktr.data.shards import MANIFEST_NAME, Manifest
    from weaktr.data.voc import VOC_CLASSES

    if spec == "voc":
        return list(VOC_CLASSES)
    if spec == "coco":
        return official_coco_classes()
    if spec is not None:
        names = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
        if not names:
            raise ValueError(f"--classes {spec}: no class names in the file")
        return names
    manifest = Path(cfg.data.root) / MANIFEST_NAME
    if not manifest.is_file():
        raise FileNotFoundError(f"no --classes given and no dataset at {manifest}: pass --classes voc|coco|FILE")
    return list(Manifest.load(manifest).classes)


def convert_command(args) -> int:
    """``weaktr convert voc|coco|folder``: the converters print their summary; a whole-dataset problem (a missing
    folder or split list, an unreadable label file) is one line and exit code 2."""
    from weaktr.data.coco import coco2014_splits, convert_coco
    from weaktr.data.folder import convert_folder
    from weaktr.data.voc import convert_voc

    common = {"max_side": args.max_side or None, "workers": args.workers, "samples_per_shard": args.samples_per_shard,
              "use_ray": args.ray}
    if args.ray:
        from weaktr.launch import RayUnavailable, init_ray  # imports Ray: only with --ray

        try:
            init_ray()
        except RayUnavailable as err:
            print(f"weaktr convert {args.layout}: error: {err}", file=sys.stderr)
            return 2
        import ray

        nodes = sum(node["Alive"] for node in ray.nodes())
        print(f"reading in Ray tasks: {ray.cluster_resources().get('CPU', 0):.0f} CPUs on {nodes} node(s) now")
    # A dataset for a bucket is written here first: the writers rename finished shards into place.
    staging = tempfile.mkdtemp(prefix="weaktr-convert-") if storage.is_uri(args.out) else None
    out = staging or args.out
    try:
        if args.layout == "voc":
            convert_voc(args.root, out, aug_list=args.aug_list, aug_mask_dir=args.aug_mask_dir,
                        cls_labels=args.cls_labels, **common)
        elif args.layout == "coco":
            convert_coco(out, coco2014_splits(args.root), official_ids=args.official_ids,
                         class_labels=args.class_labels, **common)
        else:
            convert_folder(args.images, args.labels, out, mask_dir=args.mask_dir, val_fraction=args.val_fraction,
                           **common)
        if staging:
            storage.upload_dir(staging, args.out)
            print(f"uploaded to {args.out} (with its failures.jsonl)")
    except (OSError, ValueError) as err:
        print(f"weaktr convert {args.layout}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weaktr", description="WeakTr weakly-supervised semantic segmentation")
    add_verbosity_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser(
        "predict", help="label images with a phase-2 checkpoint",
        description="Write a VOC-palette label PNG and an overlay for every image (files or folders).",
    )
    predict.add_argument("--checkpoint", required=True, help="phase-2 checkpoint directory or checkpoint.pt")
    predict.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDER", help="image files and/or folders")
    predict.add_argument("--out", required=True, help="output directory")
    predict.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test-time scales (default 1.0)")
    predict.add_argument("--no-flip", action="store_true", help="no horizontal-flip averaging")
    predict.add_argument("--window", type=int, default=480, help="sliding-window size (multiple of 16)")
    predict.add_argument("--stride", type=int, default=320, help="sliding-window stride")
    predict.add_argument("--crf", action="store_true",
                         help="refine with the official dense CRF (over the predicted classes)")
    predict.add_argument("--crf-backend", choices=BACKENDS, default=None,
                         help="dense CRF backend (default: the checkpoint's eval.crf_params.backend)")
    predict.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    predict.set_defaults(func=predict_command)

    imports = commands.add_parser(
        "import-official", help="convert an official WeakTr checkpoint into a weaktr checkpoint",
        description="Convert a checkpoint of github hustvl/WeakTr ({'model': state_dict}) into a weaktr checkpoint "
                    "directory for make_pseudo_labels.py (cam), evaluate.py and weaktr predict (seg).",
    )
    imports.add_argument("kind", choices=["cam", "seg"], help="cam: phase 1 (main.py); seg: phase 2 (segm/train.py)")
    imports.add_argument("src", help="the official checkpoint file, e.g. checkpoint_best_mIoU.pth")
    imports.add_argument("out", help="the weaktr checkpoint directory to write")
    imports.add_argument("--config", required=True,
                         help="weaktr config giving the architecture (e.g. configs/voc12.yaml)")
    imports.add_argument("--classes", default=None, help="voc, coco (official 90 classes) or a file of class names")
    imports.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value (repeatable)")
    imports.set_defaults(func=import_official_command)

    pretraining = commands.add_parser(
        "pretrain", help="pretrain a backbone on formula-drawn images (the stand-in for ImageNet weights)",
        description="Pretrain the config's model backbone on formula-drawn texture images (weaktr.pretrain, the "
                    "config's `pretrain` section) and write pretrain.out/backbone.pth for model.weights_path and "
                    "seg_model.weights_path. --check instead verifies, in seconds, that this command still makes "
                    "the weights recorded in pretrain.out (the losses of its first steps against the record's).",
    )
    pretraining.add_argument("--config", required=True, help="weaktr config (e.g. configs/synthetic.yaml)")
    pretraining.add_argument("--check", action="store_true",
                             help="rerun the first steps and compare their losses with the record's")
    pretraining.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config value (repeatable)")
    pretraining.set_defaults(func=pretrain_command)

    convert = commands.add_parser(
        "convert", help="convert a dataset (VOC, COCO or a labelled folder) into weaktr shards",
        description="Write WebDataset shards + manifest.json; unreadable items are skipped and listed in "
                    "OUT/failures.jsonl. Prints per split the samples, shards, size and items skipped.",
    )
    layouts = convert.add_subparsers(dest="layout", required=True)
    sizes = argparse.ArgumentParser(add_help=False)
    sizes.add_argument("--max-side", type=int, default=MAX_SIDE, metavar="PX",
                       help=f"store larger images downscaled to this longer side (default {MAX_SIDE}; 0 keeps all)")
    sizes.add_argument("--samples-per-shard", type=int, default=SAMPLES_PER_SHARD, metavar="N",
                       help=f"samples per tar shard (default {SAMPLES_PER_SHARD}); training needs a shard per worker")
    sizes.add_argument("--workers", type=int, default=CONVERT_WORKERS, metavar="N",
                       help=f"threads reading images (default: the cores, {CONVERT_WORKERS} here)")
    sizes.add_argument("--ray", action="store_true",
                       help="read images in Ray tasks over the cluster instead (RAY_ADDRESS, as under `ray job "
                            "submit`, or the head `ray start` started here, else a local Ray); the source folder "
                            "must be at the same path on every node")
    voc = layouts.add_parser("voc", parents=[sizes],
                             help="PASCAL VOC 2012 (VOCdevkit/VOC2012), optionally with SBD train_aug")
    voc.add_argument("root", help="the VOC2012 folder (JPEGImages/, SegmentationClass/, ImageSets/)")
    voc.add_argument("out", help="output dataset directory")
    voc.add_argument("--aug-list", default=None, help="SBD train_aug id list: adds a 'train_aug' split")
    voc.add_argument("--aug-mask-dir", default=None, help="its masks (default ROOT/SegmentationClassAug)")
    voc.add_argument("--cls-labels", default=None, help="cls_labels.npy: image labels instead of the masks'")
    coco = layouts.add_parser("coco", parents=[sizes],
                              help="COCO 2014 (train2014/, val2014/, annotations/instances_*2014.json)")
    coco.add_argument("root", help="the COCO folder")
    coco.add_argument("out", help="output dataset directory")
    coco.add_argument("--official-ids", action="store_true",
                      help="90 classes, one per category id (the official WeakTr layout) instead of 80")
    coco.add_argument("--class-labels", default=None,
                      help="the official data preparation's masks (e.g. ROOT/voc_format/class_labels: one PNG of "
                           "category ids per image), read instead of painting the instances")
    folder = layouts.add_parser("folder", parents=[sizes], help="a folder of images + a CSV/JSON label file")
    folder.add_argument("images", help="the image folder")
    folder.add_argument("labels", help="label file: CSV 'filename,class[;class]' or JSON {filename: [classes]}")
    folder.add_argument("out", help="output dataset directory")
    folder.add_argument("--mask-dir", default=None, help="optional ground-truth id masks ({name}.png)")
    folder.add_argument("--val-fraction", type=float, default=0.0, help="share of images for a 'val' split")
    convert.set_defaults(func=convert_command)

    # Listed here for --help; main() hands its arguments to weaktr.pipeline.main, which parses them.
    commands.add_parser("pipeline", add_help=False, help="run the whole pipeline, as ray_jobs/pipeline.py")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `weaktr [-v|-q] pipeline ...`: the pipeline job parses its own arguments, the verbosity flag with them.
    verbosity = list(itertools.takewhile(lambda arg: arg in ("-v", "--verbose", "-q", "--quiet"), argv))
    if argv[len(verbosity):len(verbosity) + 1] == ["pipeline"]:
        from weaktr.pipeline import main as pipeline_main  # imports Ray: only for this command

        return pipeline_main([*verbosity, *argv[len(verbosity) + 1:]], prog="weaktr pipeline")
    args = build_parser().parse_args(argv)
    configure_from_args(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
