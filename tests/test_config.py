import re
import subprocess
import sys

import pytest

from weaktr.config import Config, ConfigError, load_config, resolve_paths, save_config
from weaktr.config.loading import to_dict

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  epochs: 3\nmodel:\n  depth: 2\n")
    cfg = load_config(path, ["train.lr=3e-4", "model.weights_path=/w.pth", "model.embed_dim=null"])
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML 1.1 reads "3e-4" as a string; still a float here
    assert cfg.train.epochs == 3 and cfg.model.depth == 2
    assert cfg.model.weights_path == "/w.pth" and cfg.model.embed_dim is None


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "data.synthetic.num_train=10"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        (["train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
        (["trian.epochs=3"], "unknown config key 'trian' (did you mean 'train'?)"),
        (["data.synthetic.num_clases=3"], "'data.synthetic.num_clases' (did you mean 'data.synthetic.num_classes'?)"),
        (["nosuch.key=1"], "unknown config key 'nosuch'"),
        (["train.epochs=ten"], "config key 'train.epochs': expected int"),
        (["train.epochs=1.5"], "config key 'train.epochs': expected int"),
        (["model.pretrained=maybe"], "config key 'model.pretrained': expected bool"),
        (["train=3"], "train: expected a mapping"),
        (["train.lr"], "expected KEY=VALUE"),
        (["pseudo.attention_type=patch"], "config key 'pseudo.attention_type': expected one of 'fused', 'patchcam'"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_attention_type_choices_are_the_ops_ones():
    import typing

    from weaktr import ops
    from weaktr.config import PseudoConfig

    assert typing.get_args(typing.get_type_hints(PseudoConfig)["attention_type"]) == ops.ATTENTION_TYPES


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("data:\n  synthetic:\n    num_clases: 3\n")
    with pytest.raises(ConfigError, match="'data.synthetic.num_clases'"):
        load_config(nested)


@pytest.mark.parametrize("args, needle", [
    (["--set", "train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
    (["--config", "/nonexistent/x.yaml"], "config file not found: /nonexistent/x.yaml"),
])
def test_job_exits_2_with_one_line(args, needle):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ray_jobs" / "train_cam.py"), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_print_config_prints_the_merged_config_and_exits():
    """--print-config on a job: the config it would run with (file, defaults and --set merged, paths absolute)."""
    import yaml

    proc = subprocess.run(
        [sys.executable, str(ROOT / "ray_jobs" / "make_pseudo_labels.py"), "--checkpoint", "unused", "--config",
         "configs/smoke.yaml", "--set", "pseudo.scales=[1.0, 0.5]", "--print-config"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    expected = load_config(ROOT / "configs" / "smoke.yaml", ["pseudo.scales=[1.0, 0.5]"])
    resolve_paths(expected)
    assert printed == to_dict(expected) and printed["pseudo"]["scales"] == [1.0, 0.5]
    assert printed["data"]["root"] == str(ROOT / "data" / "smoke")


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), Config), path


def test_phase1_learning_rate_follows_the_official_linear_rule():
    # The official main.py trains at lr x batch x world_size / 512: 6e-4 at a global batch of 64 is 7.5e-5.
    voc = load_config(ROOT / "configs" / "voc12.yaml")
    assert voc.train.batch_size == 64 and voc.train.scaled_lr == pytest.approx(7.5e-5)
    coco = load_config(ROOT / "configs" / "coco14.yaml")
    assert coco.train.scaled_lr == pytest.approx(2.5e-5)
    # The batch is global: more workers split it, and the recipe (batch and lr) stays what it was.
    four = load_config(ROOT / "configs" / "voc12.yaml", ["train.num_workers=4"])
    assert four.train.worker_batch_size == 16 and four.train.scaled_lr == pytest.approx(7.5e-5)
    doubled = load_config(ROOT / "configs" / "voc12.yaml", ["train.batch_size=128"])
    assert doubled.train.scaled_lr == pytest.approx(1.5e-4)
    # Without lr_base_batch the configured lr is used as it is (the synthetic demo's recipe).
    assert load_config(ROOT / "configs" / "synthetic.yaml").train.scaled_lr == 1e-4


@pytest.mark.parametrize("section", ["train", "seg_train"])
def test_a_global_batch_that_does_not_split_over_the_workers_names_the_key(section):
    with pytest.raises(ConfigError, match=rf"'{section}.batch_size'.*{section}.num_workers=3"):
        load_config(ROOT / "configs" / "smoke.yaml", [f"{section}.batch_size=16", f"{section}.num_workers=3"])


def test_a_value_the_crf_refuses_names_its_section():
    with pytest.raises(ConfigError, match=r"'eval.crf_params': gt_prob must be in \(0, 1\)"):
        load_config(None, ["eval.crf_params.gt_prob=1.5"])


def test_a_job_layers_repeated_configs_in_order_then_its_overrides():
    """``--config RECIPE --config VARIANT``: the variant's keys replace the recipe's, the rest of the recipe stays,
    and ``--set`` goes over both (configs/backbones/ are used so)."""
    from weaktr.config import job_arg_parser, parse_job_args

    root = ROOT / "configs"
    parser = job_arg_parser("test")
    _, cfg = parse_job_args(parser, ["--config", str(root / "voc12.yaml"), "--config",
                                     str(root / "backbones" / "eva02_s.yaml"), "--set", "seg_model.dropout=0.2"])
    recipe = load_config(root / "voc12.yaml")
    assert (cfg.seg_model.backbone, cfg.seg_model.patch_size) == ("eva02_small_patch14_224.mim_in22k", 16)
    assert cfg.seg_model.encoder_norm_eps == recipe.seg_model.encoder_norm_eps == 1e-5
    assert cfg.seg_train == recipe.seg_train and cfg.seg_model.dropout == 0.2
    with pytest.raises(SystemExit):
        parse_job_args(parser, ["--config", str(root / "voc12.yaml"), "--config", str(root / "missing.yaml")])
