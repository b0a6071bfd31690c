"""A mistake never sidelines good checkpoints: a readable checkpoint of another model or
optimizer is a config error (exit 2) that touches nothing; only the trainer moves a truly
damaged checkpoint aside, and a sidelined checkpoint comes back by moving it back."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import losses, tiny

from lmtrain import config as config_lib
from lmtrain import run as run_lib
from lmtrain import train
from lmtrain.checkpoint import Checkpointer, CheckpointError
from lmtrain.cli import main
from lmtrain.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
RUN = {"train.steps": 6, "train.checkpoint_every": 3}
NOISE = ("Traceback", "Event loop is closed", "never retrieved", "never awaited")


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny run with checkpoints at steps 3 and 6 (copy it before changing anything)."""
    wd = tmp_path_factory.mktemp("trained") / "run"
    train.train(tiny(corpus, **RUN), wd)
    assert Checkpointer(wd / "checkpoints").steps() == [3, 6]
    return wd


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(d: Path) -> dict[str, str]:
    """Every file and directory under `d`, with the hash of each file's bytes."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(d.rglob("*"))
    }


def reader_command(name: str, wd: Path, tmp_path: Path) -> list[str]:
    return {
        "eval": ["eval", "--workdir", str(wd)],
        "generate": [
            "generate",
            "--workdir",
            str(wd),
            "--prompt",
            "alpha",
            "--max-new-tokens",
            "2",
        ],
        "export": ["export", "--workdir", str(wd), "--out", str(tmp_path / "out")],
        "lm-eval": [
            "lm-eval",
            "--workdir",
            str(wd),
            "--tasks",
            "lmtrain_mc",
            "--include-path",
            str(ROOT / "tests" / "lm_eval_tasks"),
            "--limit",
            "2",
        ],
    }[name]


# eval stays in the fast lane; the other readers share its code path (run.restore_params).
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "reader",
    ["eval", *(pytest.param(r, marks=SLOW) for r in ("generate", "export", "lm-eval"))],
)
def test_a_reader_with_a_wrong_shape_is_exit_2_and_touches_nothing(
    trained, tmp_path, capsys, reader
):
    if reader == "lm-eval":
        pytest.importorskip("lm_eval")
    wd = copy_run(trained, tmp_path / "run")
    before = snapshot(wd)
    args = [*reader_command(reader, wd, tmp_path), "--set", "model.d_model=64"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.d_model is 32 in the checkpoint, 64 here" in err, err
    assert "Nothing was changed" in err and not any(n in err for n in NOISE), err
    assert snapshot(wd) == before
    assert not (tmp_path / "out").exists()
    # The same reader without the typo works on the untouched run.
    assert main(reader_command(reader, wd, tmp_path)) == 0
    assert snapshot(wd) == before


@SLOW
def test_the_eval_typo_from_the_issue_prints_one_line_and_the_run_still_resumes(
    corpus, trained, tmp_path
):
    """The issue's report, run as the user ran it: a wrong --set in `lmtrain eval`, then the
    command that made the run resumes it."""
    wd = copy_run(trained, tmp_path / "run")
    before = snapshot(wd / "checkpoints")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lmtrain", "eval", "--workdir", str(wd)]
    p = subprocess.run([*cmd, "--set", "model.d_model=64"], capture_output=True, text=True, env=env)
    assert p.returncode == 2
    ours = [x for x in p.stderr.splitlines() if x.startswith("lmtrain")]
    assert len(ours) == 1 and "model.d_model is 32 in the checkpoint, 64 here" in ours[0]
    assert not any(n in p.stderr for n in NOISE), p.stderr
    assert snapshot(wd / "checkpoints") == before
    s = train.train(tiny(corpus, **{**RUN, "train.steps": 8}), wd)
    assert s["step"] == 8  # resumed at 6
    assert sorted(losses(wd)) == list(range(1, 9))


def test_resume_checks_name_each_setting_and_its_way_out(corpus):
    saved = tiny(corpus, **RUN)

    def refused(**sets) -> str:
        with pytest.raises(ConfigError) as e:
            run_lib.check_resume_config(saved, tiny(corpus, **{**RUN, **sets}))
        return str(e.value)

    msg = refused(**{"model.d_model": 64})
    assert "model.d_model is 32 in the checkpoint, 64 here" in msg and "new --workdir" in msg
    msg = refused(**{"data.seq_len": 64})
    assert "data.seq_len is 32 in the checkpoint, 64 here" in msg and "model.init_from" in msg
    msg = refused(**{"optim.name": "lion"})
    assert "optim.name is 'adamw' in the checkpoint, 'lion' here" in msg
    assert "--set train.restore=params" in msg
    both = refused(**{"optim.name": "lion", "model.n_layers": 3})
    assert "model.n_layers" in both and "optim.name" in both
    # Allowed: the way out, and settings that change how the same parameters are computed.
    ok = {"optim.name": "lion", "train.restore": "params", "model.remat": "full"}
    changed = run_lib.check_resume_config(saved, tiny(corpus, **{**RUN, **ok}))
    assert set(changed) == {"optim.name", "train.restore", "model.remat"}
    with pytest.raises(ConfigError, match="train.restore 'opt' is unknown; valid: all, params"):
        tiny(corpus, **{"train.restore": "opt"})


@SLOW
def test_another_optimizer_on_resume_is_exit_2_and_its_way_out_resumes(
    corpus, trained, tmp_path, capsys
):
    wd = copy_run(trained, tmp_path / "run")
    before = snapshot(wd / "checkpoints")
    lion = {**RUN, "train.steps": 9, "optim.name": "lion"}
    with pytest.raises(ConfigError, match="add --set train.restore=params"):
        train.train(tiny(corpus, **lion), wd)
    assert snapshot(wd / "checkpoints") == before
    # The checkpoint's own state tree is checked too (config.json may say lion already).
    run = run_lib.setup(tiny(corpus, **lion))
    with pytest.raises(ConfigError, match="holds adamw's optimizer state; optim.name=lion"):
        Checkpointer(wd / "checkpoints").restore_latest(
            run.abstract_state, config=config_lib.to_dict(run.cfg)
        )
    assert snapshot(wd / "checkpoints") == before

    # The reference: adamw goes on uninterrupted to step 7; its step-7 loss is computed from
    # step 6's parameters on the 7th batch.
    ref = copy_run(trained, tmp_path / "ref")
    train.train(tiny(corpus, **{**RUN, "train.steps": 7}), ref)
    fresh_lion = train.train(tiny(corpus, **{**lion, "train.steps": 1}), tmp_path / "fresh")
    assert abs(fresh_lion["loss"] - losses(ref)[7]) > 1e-3  # a fresh start would show

    capsys.readouterr()
    s = train.train(tiny(corpus, **{**lion, "train.restore": "params"}), wd)
    err = capsys.readouterr().err
    assert "resumed at step 6 with a fresh lion optimizer state (train.restore=params)" in err
    assert s["step"] == 9
    assert losses(wd)[7] == pytest.approx(losses(ref)[7], rel=1e-6)  # params + data position
    # Requeue-safe: the same command again finds lion's state and restores all of it.
    s = train.train(tiny(corpus, **{**lion, "train.steps": 10, "train.restore": "params"}), wd)
    err = capsys.readouterr().err
    assert "resumed at step 9" in err and "fresh" not in err and s["step"] == 10


def _damage(step_dir: Path, how: str) -> None:
    state = step_dir / "state"
    if how == "truncated":
        data = [f for f in state.rglob("*") if f.is_file() and f.parent.name == "d"]
        assert data
        for f in data:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "array_file_deleted":
        data = [f for f in state.rglob("*") if f.is_file() and f.parent.name == "d"]
        assert data
        for f in data:
            f.unlink()
    elif how == "bad_metadata":
        (state / "_METADATA").write_bytes(b"\x00\xffnot json")
    else:
        raise AssertionError(how)


@SLOW
@pytest.mark.parametrize("how", ["truncated", "array_file_deleted", "bad_metadata"])
def test_damaged_latest_falls_back_readers_leave_it_the_trainer_moves_it_and_it_comes_back(
    corpus, trained, tmp_path, capsys, how
):
    wd = copy_run(trained, tmp_path / "run")
    assert main(["eval", "--workdir", str(wd)]) == 0
    good = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert good["step"] == 6
    _damage(wd / "checkpoints" / "6", how)
    before = snapshot(wd / "checkpoints")

    # A reader falls back to step 3 and moves nothing.
    assert main(["eval", "--workdir", str(wd)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["step"] == 3
    assert "checkpoint at step 6 is unreadable" in out.err
    assert snapshot(wd / "checkpoints") == before

    # The trainer falls back too, moves step 6 aside, and says where it went.
    s = train.train(tiny(corpus, **RUN), wd)
    err = capsys.readouterr().err
    assert s["step"] == 6
    (aside,) = (wd / "checkpoints").glob("corrupt-6-*")
    assert f"moved the unreadable checkpoint of step 6 aside to {aside.name}/" in err
    # The next run names the sidelined checkpoint and how to bring it back.
    assert main(["eval", "--workdir", str(wd)]) == 0
    err = capsys.readouterr().err
    assert f"`mv {aside} {wd / 'checkpoints' / '6'}` brings it back" in err

    # Repaired and moved back, it is step 6 again, with its own numbers.
    shutil.rmtree(aside / "state")
    shutil.copytree(trained / "checkpoints" / "6" / "state", aside / "state")
    shutil.rmtree(wd / "checkpoints" / "6")
    aside.rename(wd / "checkpoints" / "6")
    assert main(["eval", "--workdir", str(wd)]) == 0
    back = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert back == good


@SLOW
def test_when_no_checkpoint_reads_nothing_is_moved(corpus, trained, tmp_path, capsys):
    wd = copy_run(trained, tmp_path / "run")
    for step in (3, 6):
        _damage(wd / "checkpoints" / str(step), "truncated")
    before = snapshot(wd / "checkpoints")
    assert main(["eval", "--workdir", str(wd)]) == 1
    assert "could be read" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="Nothing was moved"):
        train.train(tiny(corpus, **RUN), wd)
    assert snapshot(wd / "checkpoints") == before
