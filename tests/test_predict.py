"""``weaktr predict``: any image mode and size, EXIF orientation, folders, unreadable files, wrong checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from seg_helpers import NUM_CLASSES, save_random_checkpoint, tiny_config

from weaktr.cli import load_rgb, main
from weaktr.data.voc import voc_palette

CLASSES = ["hstripes", "vstripes", "diagonal"][:NUM_CLASSES]
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict-ckpt")
    cfg = tiny_config(tmp, tmp)
    return save_random_checkpoint(tmp / "seg", cfg, CLASSES), save_random_checkpoint(tmp / "cam", cfg, CLASSES, "cam")


def _noise(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _write_inputs(folder):
    """Images of every awkward kind; returns {output stem: (width, height) as displayed}."""
    folder.mkdir()
    Image.fromarray(_noise(50, 70, 1), "L").save(folder / "gray.png")
    Image.fromarray(_noise(40, 90, 4), "RGBA").save(folder / "rgba.png")
    Image.fromarray(_noise(75, 45, 3)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(_noise(33, 47, 3)).convert("P").save(folder / "palette.gif")
    # Stored 80 wide x 48 high; EXIF orientation 6 means "rotate 90° clockwise to display": 48 x 80.
    rotated = Image.fromarray(_noise(48, 80, 3))
    exif = rotated.getexif()
    exif[EXIF_ORIENTATION] = 6
    rotated.save(folder / "exif.jpg", exif=exif)
    (folder / "sub").mkdir()
    Image.fromarray(_noise(130, 200, 3)).save(folder / "sub" / "large.jpg")  # larger than the window
    return {"gray": (70, 50), "rgba": (90, 40), "cmyk": (45, 75), "palette": (47, 33), "exif": (48, 80),
            "sub/large": (200, 130)}


def test_exif_orientation_and_modes_become_upright_rgb(tmp_path):
    expected = _write_inputs(tmp_path / "in")
    for stem, size in expected.items():
        suffix = next(p.suffix for p in (tmp_path / "in").glob(f"{stem}.*"))
        image = load_rgb(tmp_path / "in" / f"{stem}{suffix}")
        assert image.dtype == np.uint8 and image.shape == (size[1], size[0], 3), stem


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    levels = np.arange(0, 256, 17, dtype=np.uint16)  # [16] 8-bit levels
    path = tmp_path / "deep.png"
    Image.fromarray(np.tile(levels * 257, (3, 1))).save(path)  # a 16-bit PNG of the same levels
    assert Image.open(path).mode.startswith("I")
    image = load_rgb(path)  # [3, 16, 3]
    assert np.array_equal(image[1, :, 0], levels) and np.array_equal(image[..., 2], image[..., 0])


def test_predict_labels_a_folder_and_files_of_any_kind(checkpoints, tmp_path, capsys):
    expected = _write_inputs(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not an image")  # ignored inside a folder
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    extra = tmp_path / "extra.png"
    Image.fromarray(_noise(20, 20, 3)).save(extra)  # smaller than one patch row of the window

    code = main([
        "predict", "--checkpoint", str(checkpoints[0]), str(tmp_path / "in"), str(broken), str(extra),
        "--out", str(tmp_path / "out"), "--window", "64", "--stride", "48", "--no-flip",
    ])
    assert code == 1  # one unreadable input
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.jpg" in captured.err
    assert not (tmp_path / "out" / "broken.png").exists()

    palette = voc_palette()
    for stem, size in {**expected, "extra": (20, 20)}.items():
        mask = Image.open(tmp_path / "out" / f"{stem}.png")
        assert mask.mode == "P" and mask.size == size, stem
        assert mask.getpalette()[: 3 * 8] == palette[: 3 * 8]
        assert np.asarray(mask).max() <= NUM_CLASSES
        overlay = Image.open(tmp_path / "out" / f"{stem}_overlay.jpg")
        assert overlay.mode == "RGB" and overlay.size == size, stem
    assert f"{len(expected) + 1} of {len(expected) + 2} inputs labelled" in captured.out


def test_predict_with_scales_flip_and_crf(checkpoints, tmp_path):
    Image.fromarray(_noise(70, 100, 3)).save(tmp_path / "a.jpg")
    args = ["predict", "--checkpoint", str(checkpoints[0]), str(tmp_path / "a.jpg"), "--window", "64", "--stride",
            "32", "--scales", "0.75", "1.25"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--crf", "--out", str(tmp_path / "crf")]) == 0
    plain = np.asarray(Image.open(tmp_path / "plain" / "a.png"))
    refined = np.asarray(Image.open(tmp_path / "crf" / "a.png"))
    assert plain.shape == refined.shape == (70, 100)
    assert not np.array_equal(plain, refined)
    # The same CRF on the torch backend (the checkpoint's default is auto: pydensecrf where it is installed).
    assert main([*args, "--crf", "--crf-backend", "torch", "--out", str(tmp_path / "torch")]) == 0
    on_torch = np.asarray(Image.open(tmp_path / "torch" / "a.png"))
    assert np.mean(on_torch == refined) >= 0.99


def test_predict_refuses_other_checkpoint_kinds_and_bad_windows(checkpoints, tmp_path, capsys):
    Image.fromarray(_noise(30, 30, 3)).save(tmp_path / "a.png")
    assert main(["predict", "--checkpoint", str(checkpoints[1]), str(tmp_path / "a.png"), "--out", str(tmp_path)]) == 2
    assert "'cam' checkpoint; this needs a phase-2 segmentation" in capsys.readouterr().err

    assert main(["predict", "--checkpoint", str(checkpoints[0]), str(tmp_path / "a.png"), "--out", str(tmp_path),
                 "--window", "50"]) == 2
    assert "multiple of the patch size 16" in capsys.readouterr().err

    assert main(["predict", "--checkpoint", str(tmp_path / "nowhere"), str(tmp_path / "a.png"),
                 "--out", str(tmp_path)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
