"""train.wandb_project: the same scalars and the config in Weights & Biases (offline mode, the
run read back from its .wandb file)."""

import json
import struct

import pytest
from conftest import tiny

from lmtrain import train


def wandb_records(path):
    """The protobuf Records of a .wandb file (a LevelDB-style log of 32 KiB blocks after a
    7-byte ':W&B' header; each chunk: crc32c, length, kind FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def read_run(workdir):
    """(run record, config dict, {step: {key: value}}) of every offline run in workdir."""
    runs, config, history = [], {}, {}
    for f in sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb")):
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                runs.append(r.run)
                config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "history":
                row = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item
                }
                history.setdefault(row["_step"], {}).update(row)
    return runs, config, history


@pytest.mark.slow
def test_wandb_logs_the_tensorboard_scalars_and_the_config_and_resumes_the_run(
    corpus, tmp_path, monkeypatch
):
    import wandb  # noqa: F401 - the dev extra has it: fail loudly, never skip

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    wd = tmp_path / "run"
    sets = {"train.wandb_project": "lmtrain-tests", "train.wandb_run_name": "tiny-1"}
    cfg = tiny(corpus, **{**sets, "train.steps": 4, "train.checkpoint_every": 2})
    train.train(cfg, wd)
    runs, config, history = read_run(wd)
    assert [(r.project, r.display_name) for r in runs] == [("lmtrain-tests", "tiny-1")]
    saved = json.loads((wd / "config.json").read_text())
    assert config["model"] == saved["model"] and config["train"] == saved["train"]
    # Every number of metrics.jsonl is in W&B under TensorBoard's tag at the same step.
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    checked = 0
    for row in rows:
        prefix = "eval" if "val_loss" in row else "train"
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                assert history[row["step"]][k if "/" in k else f"{prefix}/{k}"] == pytest.approx(v)
                checked += 1
    assert checked > 20 and {"train/loss", "eval/val_loss"} <= set(history[4])

    # Resumed for 2 more steps: the same W&B run continues.
    train.train(tiny(corpus, **{**sets, "train.steps": 6, "train.checkpoint_every": 2}), wd)
    runs, _, history = read_run(wd)
    assert len(runs) == 2 and runs[0].run_id == runs[1].run_id
    assert {5, 6} <= set(history) and "train/loss" in history[6]
