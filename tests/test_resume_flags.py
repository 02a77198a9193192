"""Every job's --resume: work done under a run's name is continued only when asked, and --resume with nothing to
continue is refused. Both are decided before Ray starts (here a job that goes on to start Ray raises WentOn
instead). What a resumed run then does is tested with each job: test_train_cam.py, test_seg_loop.py,
test_pseudo.py, test_pipeline.py, test_sweep.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from job_helpers import load_job

ROOT = Path(__file__).resolve().parents[1]


class WentOn(Exception):
    """The job got past its checks and asked for Ray."""


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def init_ray():
        raise WentOn

    monkeypatch.setattr("weaktr.launch.init_ray", init_ray)


def _args(tmp_path: Path, *args: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"run.storage_path={tmp_path / 'runs'}",
            "--set", f"data.root={tmp_path / 'data'}", *args]


# job: (the earlier work it finds, the place it names, extra arguments)
JOBS = {
    "train_cam": ("runs/smoke-cam/checkpoint_2026-11-29_00-00-00.000000", "runs/smoke-cam", ()),
    "train_seg": ("runs/smoke-cam-seg/checkpoint_2026-11-29_00-00-00.000000", "runs/smoke-cam-seg", ()),
    "make_pseudo_labels": ("pseudo/run_config.json", "pseudo", ("--checkpoint", "ckpt")),
    "pipeline": ("runs/smoke-cam/stages/data.json", "runs/smoke-cam", ()),
}


@pytest.mark.parametrize("job", list(JOBS))
def test_a_job_refuses_to_continue_earlier_work_unless_resumed(job, tmp_path, capsys):
    earlier, named, extra = JOBS[job]
    main = load_job(job).main
    args = _args(tmp_path, "--set", f"pseudo.out_dir={tmp_path / 'pseudo'}", *extra)

    assert main([*args, "--resume"]) == 2
    assert "--resume: no " in capsys.readouterr().err

    found = tmp_path / earlier
    found.parent.mkdir(parents=True)
    if found.suffix == ".json":
        found.write_text("{}")
    else:
        found.mkdir()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"already exists at {tmp_path / named}: pass --resume to continue it" in err, err
    assert "Traceback" not in err
    with pytest.raises(WentOn):  # asked, it goes on
        main([*args, "--resume"])


def test_pipeline_from_a_stage_continues_an_existing_run_without_resume(tmp_path):
    record = tmp_path / "runs" / "smoke-cam" / "stages" / "data.json"
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    with pytest.raises(WentOn):
        load_job("pipeline").main(_args(tmp_path, "--from", "phase2"))


def test_a_training_run_is_found_under_a_storage_uri_as_under_a_path(tmp_path):
    """``run.storage_path`` may be a URI Ray Train takes (s3://, gs://): the run is looked up through pyarrow's
    file systems, here its local one (file://), the same code path."""
    from weaktr.launch import training_run

    run = tmp_path / "runs" / "cam"
    uri = f"file://{tmp_path / 'runs'}"
    assert training_run(uri, "cam") == (None, f"{uri}/cam")
    assert training_run(str(tmp_path / "runs"), "cam") == (None, str(run))
    (run / "checkpoint_2026-11-29_00-00-00.000000").mkdir(parents=True)
    assert training_run(uri, "cam") == (f"{uri}/cam", f"{uri}/cam")
    assert training_run(str(tmp_path / "runs"), "cam") == (str(run), str(run))
