"""Ray Tune sweeps (weaktr.sweep, ray_jobs/tune_sweep.py): the search space is checked before anything starts, ASHA
stops trials early, --resume skips finished trials, and the best trial's config trains as it is."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from weaktr import storage
from weaktr.checkpoint import load_checkpoint
from weaktr.config import ConfigError, load_config, save_config, to_dict, with_values
from weaktr.data.synthetic import SyntheticSpec, iter_synthetic
from weaktr.sweep import RESULT_FILES, SAVED_CONFIG, check_sweep, objective

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ray_jobs"))

import tune_sweep  # noqa: E402


def sweep_config(*overrides: str):
    return load_config(ROOT / "configs" / "tune_fusion.yaml", overrides)


# --------------------------------------------------------------------------- the search space, without Ray


@pytest.mark.parametrize("space, message", [
    ({"model.no_such_key": {"choice": [1, 2]}}, "'tune.space.model.no_such_key': unknown config key"),
    ({"train.lr": {"lognormal": [1e-4, 1e-3]}}, "'tune.space.train.lr': unknown distribution 'lognormal'"),
    ({"train.lr": {"uniform": [1e-3, 1e-4]}}, "'tune.space.train.lr': uniform needs low < high"),
    ({"train.lr": {"loguniform": [0, 1e-3]}}, "'tune.space.train.lr': loguniform needs low > 0"),
    ({"train.lr": {"quniform": [1e-4, 1e-3]}}, "'tune.space.train.lr': quniform takes [low, high, q]"),
    ({"train.lr": {"choice": []}}, "'tune.space.train.lr': choice takes a non-empty list"),
    ({"model.reduction": {"uniform": [1, 8]}}, "'tune.space.model.reduction': uniform draws floats"),
    ({"model.reduction": {"choice": [2, "four"]}}, "'tune.space.model.reduction': value 'four'"),
    ({"train.batch_size": {"choice": [32, 0]}}, "'tune.space.train.batch_size': value 0"),
    ({"seg_train.lr": {"choice": [1e-4]}}, "a 'cam' sweep trains with the sections"),
    ({"train.cam_eval": {"choice": [None]}}, "'train.cam_eval' is a section or a list"),
    ({"train.lr": [1e-4, 1e-3]}, "expected one distribution"),
])
def test_a_bad_search_space_names_its_key(space, message):
    cfg = sweep_config()
    cfg.tune.space = space
    with pytest.raises(ConfigError) as err:
        check_sweep(cfg)
    assert message in str(err.value)


def test_the_example_sweeps_check_and_yaml_numbers_without_a_dot_are_read_as_numbers():
    assert check_sweep(load_config(ROOT / "configs" / "tune_clip.yaml"))["seg_train.clip_patch_size"] == (
        "choice", [16, 32, 64])
    cfg = sweep_config()
    cfg.tune.space = yaml.safe_load("train.lr: {loguniform: [3e-4, 3e-3]}")  # YAML 1.1: two strings
    assert check_sweep(cfg) == {"train.lr": ("loguniform", [3e-4, 3e-3])}


@pytest.mark.parametrize("setting, message", [
    ("tune.phase=detect", "'tune.phase'"), ("tune.scheduler=pbt", "'tune.scheduler'"),
    ("tune.grace_period=99", "'tune.grace_period'"), ("tune.reduction_factor=1", "'tune.reduction_factor'"),
    ("tune.space={}", "'tune.space': empty"),
])
def test_bad_scheduling_settings_name_their_key(setting, message):
    with pytest.raises(ConfigError) as err:
        check_sweep(sweep_config(setting))
    assert message in str(err.value)


def test_the_objective_is_what_each_phase_reports_every_epoch():
    assert objective(sweep_config()) == "cam_mIoU"
    assert objective(sweep_config("train.cam_eval.split=null")) == "val_mAP"  # a dataset without masks
    assert objective(load_config(ROOT / "configs" / "tune_clip.yaml")) == "val_mIoU"


def test_a_trial_asks_for_fractional_gpus_per_worker():
    # Two half-GPU workers per GPU: eight single-worker phase-1 trials fill a 4-GPU node.
    from weaktr.train.cam_loop import train_loop_per_worker
    from weaktr.train.common import make_trainer

    cfg = sweep_config("train.use_gpu=true", "train.gpus_per_worker=0.5", "train.cpus_per_worker=4")
    trainer = make_trainer(train_loop_per_worker, cfg, cfg.train, name="x", score_attribute="cam_mIoU", paths=())
    assert trainer.scaling_config.num_workers == 1
    assert trainer.scaling_config.resources_per_worker == {"CPU": 4, "GPU": 0.5}


def test_with_values_sets_dotted_keys_and_checks_them():
    cfg = with_values(sweep_config(), {"train.lr": 2e-3, "model.pool": "avg"})
    assert (cfg.train.lr, cfg.model.pool) == (2e-3, "avg")
    with pytest.raises(ConfigError, match="'train.nope'"):
        with_values(cfg, {"train.nope": 1})


def test_the_job_refuses_a_bad_space_before_anything_starts(tmp_path):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "ray_jobs/tune_sweep.py", "--config", "configs/tune_fusion.yaml",
         "--set", f"run.storage_path={tmp_path}", "--set", "tune.space={model.heads: {choice: [1, 2]}}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'tune.space.model.heads': unknown config key" in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())  # no sweep directory, no data, no Ray
    assert time.monotonic() - started < 60


def test_a_sweep_in_a_bucket_keeps_its_config_and_results_there(s3_bucket, tmp_path):
    """run.storage_path may be a bucket's URI (Tune keeps its experiment there itself): the sweep's own files (the
    config it started with, trials.csv, best_config.yaml, objective.png) go there, and --resume checks it."""
    from weaktr.sweep import prepare_sweep, sweep_dir, write_results

    cfg = sweep_config(f"run.storage_path={s3_bucket}/sweeps", "run.name=fusion")
    saved = prepare_sweep(cfg, resume=False)
    assert saved == f"{s3_bucket}/sweeps/fusion/sweep_config.yaml" == storage.join(sweep_dir(cfg), SAVED_CONFIG)
    save_config(cfg, saved)
    with pytest.raises(ConfigError, match=f"--resume: no sweep to continue at {s3_bucket}/sweeps/fusion"):
        prepare_sweep(sweep_config(f"run.storage_path={s3_bucket}/sweeps", "run.name=fusion"), resume=True)

    drawn = [{"model.reduction": 2, "model.feat_reduction": 8, "model.pool": "avg", "train.lr": 2e-3},
             {"model.reduction": 4, "model.feat_reduction": 2, "model.pool": "max", "train.lr": 5e-4}]
    assert set(drawn[0]) == set(cfg.tune.space)
    rows = [{"trial": f"t{i}", **values, "cam_mIoU": 0.6 - i / 10, "best_epoch": 1, "cam_bg_threshold": 0.4,
             "epochs_run": 1, "status": "completed"} for i, values in enumerate(drawn)]
    paths = write_results(cfg, rows)
    assert set(paths.values()) == {storage.join(sweep_dir(cfg), name) for name in RESULT_FILES}
    table = list(csv.DictReader(io.StringIO(storage.read_bytes(paths["trials.csv"]).decode())))
    assert [(row["trial"], row["model.pool"]) for row in table] == [("t0", "avg"), ("t1", "max")]
    assert storage.read_bytes(paths["objective.png"])[:4] == b"\x89PNG"
    (tmp_path / "best.yaml").write_bytes(storage.read_bytes(paths["best_config.yaml"]))
    best = load_config(tmp_path / "best.yaml")
    assert best.run.name == "fusion-best" and (best.model.reduction, best.model.pool, best.train.lr) == (2, "avg", 2e-3)


def test_noisy_pseudo_labels_leave_images_and_masks_as_they_were():
    clean = list(iter_synthetic(SyntheticSpec(num_classes=3), 0, 6))
    noisy = list(iter_synthetic(SyntheticSpec(num_classes=3, pseudo_flip=0.5, pseudo_dilate=1.0), 0, 6,
                                with_pseudo=True))
    changed = 0
    for a, b in zip(clean, noisy):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.pseudo is None
        assert np.array_equal(b.pseudo == 255, b.mask == 255)  # the ignore band stays ignored
        changed += int((b.pseudo != b.mask).sum())
    assert changed > 0


# --------------------------------------------------------------------------- on Ray


# Background thresholds a trial's per-epoch CAM mIoU searches. 1.0 labels every pixel background whatever the CAMs,
# so a trial searching only 1.0 scores the same constant every epoch; SEARCHED includes 1.0, so it scores at least
# that constant (more as soon as any threshold labels some object right).
SEARCHED, ALL_BACKGROUND, SEARCHED_AGAIN = "0.1:1.0:0.1", "1.0:1.0:0.1", "0.10:1.00:0.10"


def tiny_sweep(tmp_path: Path, name: str, *overrides: str) -> Path:
    """A 3-trial phase-1 sweep on the smoke dataset, one trial at a time, 2 epochs, ASHA's rung after 1, written as
    a config file. All three train the same model from the same seed. The first, alone at its rung, goes on; the
    second scores the all-background constant, below the first: ASHA must stop it after one epoch; the third
    scores what the first did, above the rung's cutoff (halfway between the two), and goes on."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"run.name={name}", f"run.storage_path={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}",
        "train.num_workers=1", "train.batch_size=16", "train.checkpoints_to_keep=1",
        "tune.phase=cam", "tune.num_samples=1", "tune.max_concurrent_trials=1", "tune.grace_period=1",
        f"tune.space={{train.cam_eval.sweep: {{grid: ['{SEARCHED}', '{ALL_BACKGROUND}', '{SEARCHED_AGAIN}']}}}}",
        *overrides,
    ])
    path = tmp_path / f"{name}.yaml"
    save_config(cfg, path)
    return path


def read_trials(sweep: Path) -> dict[str, dict]:
    with open(sweep / "trials.csv") as f:
        return {row["train.cam_eval.sweep"]: row for row in csv.DictReader(f)}


def test_asha_stops_a_trial_resume_skips_finished_ones_and_the_best_config_is_the_trained_one(ray_session, tmp_path):
    config = tiny_sweep(tmp_path, "sweep", "tracking.backend=mlflow")
    sweep = tmp_path / "runs" / "sweep"
    # Ray Train's default 2 s look at the workers (not the session's 0.25 s, conftest): the kill must land between
    # the third trial's first and last report, and at 0.25 s a trial has trained both epochs between two of the
    # test's looks (seen once). launch.job_runtime_env carries the setting to the trials.
    env = {**os.environ, "RAY_ADDRESS": ray_session[0], "TUNE_GLOBAL_CHECKPOINT_S": "1",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}
    job = subprocess.Popen(
        [sys.executable, "ray_jobs/tune_sweep.py", "--config", str(config)], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:  # killed once two trials have ended and the third has trained (and saved) one epoch
        deadline = time.monotonic() + 240
        while not (_finished_trials(sweep) == 2 and _reports(sweep, "00002") >= 1):
            assert job.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled"
            time.sleep(0.5)
        time.sleep(1.5)  # the experiment state is saved every second
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert (_reports(sweep, "00000"), _reports(sweep, "00001")) == (2, 1)

    assert tune_sweep.main(["--config", str(config)]) == 2  # a plain rerun is refused: it would mix two sweeps
    # The resumed sweep runs as a user runs it, in a driver of its own, and may not take forever.
    resumed = subprocess.Popen(
        [sys.executable, "ray_jobs/tune_sweep.py", "--config", str(config), "--resume"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = resumed.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        stacks = subprocess.run([str(Path(sys.executable).with_name("py-spy")), "dump", "--pid", str(resumed.pid)],
                                capture_output=True, text=True, timeout=60).stdout
        os.killpg(resumed.pid, signal.SIGKILL)
        output, _ = resumed.communicate()
        pytest.fail(f"the resumed sweep did not end in 300 s; its output:\n{output[-4000:]}\nits stacks:\n{stacks}")
    assert resumed.returncode == 0, output[-4000:]
    assert (_reports(sweep, "00000"), _reports(sweep, "00001")) == (2, 1)  # the ended trials were not rerun
    # One trial at a time (tune.max_concurrent_trials: 1, on a head with 4 CPUs): each began after the last ended.
    for earlier, later in (("00000", "00001"), ("00001", "00002")):
        assert _timestamps(sweep, later)[0] >= _timestamps(sweep, earlier)[-1]
    # The interrupted trial continued from its Ray Train checkpoint rather than from scratch (its epochs never go
    # back; the last one may be reported twice when the kill came between its checkpoint and Tune's record of it).
    epochs = [json.loads(line)["epochs_done"] for line in _result_lines(sweep, "00002")]
    assert epochs[-1] == 2 and epochs == sorted(epochs) and epochs.count(1) == 1, epochs

    trials = read_trials(sweep)
    first, second, third = trials[SEARCHED], trials[ALL_BACKGROUND], trials[SEARCHED_AGAIN]
    assert [(t["status"], t["epochs_run"]) for t in (first, third)] == [("completed", "2")] * 2
    assert (second["status"], second["epochs_run"]) == ("stopped early", "1")
    assert float(second["cam_mIoU"]) < min(float(first["cam_mIoU"]), float(third["cam_mIoU"]))
    assert float(second["cam_bg_threshold"]) == 1.0
    assert list(trials.values())[-1] == second  # best first
    # One MLflow run per trial in the sweep's experiment (the trials' store, sweep/trials/mlflow.db); the trial
    # killed mid-run went on in its run. Each run holds every epoch its trial trained, which for the trial ASHA
    # stopped may be one more than Tune recorded (the stop lands while the next epoch runs).
    from test_tracking import metric_steps, mlflow_runs

    runs = {run.info.run_name: run for run in mlflow_runs(sweep / "trials", "sweep")}
    assert sorted(runs) == sorted(t["trial"] for t in trials.values()), sorted(runs)
    for trial in trials.values():
        run = runs[trial["trial"]]
        steps = {step for step, _ in metric_steps(sweep / "trials", run.info.run_id, "loss")}
        assert steps == set(range(len(steps))) and len(steps) >= int(trial["epochs_run"]), (trial["trial"], steps)
    assert (sweep / "objective.png").stat().st_size > 0

    # best_config.yaml is what train_cam.py takes: the config the best trial trained with (its checkpoint keeps
    # it), under its own run name. (README: a phase-2 sweep's best_config.yaml retrained with train_seg.py.)
    best_trial = list(trials.values())[0]["trial"]
    # (Ray Train keeps checkpoint_manager_snapshot.json beside its checkpoint_<time> folders.)
    checkpoints = [p for p in (sweep / "trials" / best_trial).glob("checkpoint_*") if p.is_dir()]
    trained_with = load_checkpoint(checkpoints[0])["config"]
    best = to_dict(load_config(sweep / "best_config.yaml"))
    assert best["run"] == {**trained_with["run"], "name": "sweep-best", "storage_path": str(tmp_path / "runs")}
    assert {k: v for k, v in best.items() if k != "run"} == {k: v for k, v in trained_with.items() if k != "run"}
    assert best["train"]["cam_eval"]["sweep"] in (SEARCHED, SEARCHED_AGAIN)


def _trial_dir(sweep: Path, suffix: str):
    return next((p for p in sweep.glob(f"run_trial_*_{suffix}_*") if p.is_dir()), None)


def _result_lines(sweep: Path, suffix: str) -> list[str]:
    directory = _trial_dir(sweep, suffix)
    result = directory / "result.json" if directory else None
    return result.read_text().splitlines() if result and result.exists() else []


def _timestamps(sweep: Path, suffix: str) -> list[int]:
    return [json.loads(line)["timestamp"] for line in _result_lines(sweep, suffix)]


def _reports(sweep: Path, suffix: str) -> int:
    return len(_result_lines(sweep, suffix))


def _finished_trials(sweep: Path) -> int:
    states = sorted(sweep.glob("experiment_state-*.json"))
    if not states:
        return 0
    try:
        text = states[-1].read_text()
    except OSError:
        return 0
    return text.count("TERMINATED")
