"""Config loading, overrides and their error messages; every experiment file loads."""

import dataclasses
import json
from pathlib import Path

import pytest
from flax import nnx

from lmtrain import config as config_lib
from lmtrain import data, models
from lmtrain import run as run_lib
from lmtrain.cli import main
from lmtrain.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.py"))


def test_override_parses_literals_and_keeps_types():
    cfg = config_lib.override(
        Config(),
        config_lib.parse_sets(
            [
                "model.d_model=512",
                "optim.lr=1",
                "mesh.shape=(2,-1,1)",
                "data.source=/tmp/x.txt",
                "model.remat=True",
            ]
        ),
    )
    assert cfg.model.d_model == 512
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int accepted for float
    assert cfg.mesh.shape == (2, -1, 1, 1)  # three numbers: sequence 1
    assert cfg.data.source == "/tmp/x.txt"  # unquoted strings stay strings
    assert cfg.model.remat == "full"  # True in older configs means the "full" policy


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.d_modle'.*'model.d_model'"):
        config_lib.override(Config(), {"model.d_modle": 3})
    with pytest.raises(ConfigError, match=r"'optim.lr'"):
        config_lib.override(Config(), {"optim.lrr": 3})


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"model.n_layers must be int"):
        config_lib.override(Config(), {"model.n_layers": 2.5})
    with pytest.raises(ConfigError, match=r"train.steps must be int"):
        config_lib.override(Config(), {"train.steps": "many"})
    with pytest.raises(ConfigError, match=r"mesh.shape needs 4 entries"):
        config_lib.override(Config(), {"mesh.shape": (1, 2)})
    with pytest.raises(ConfigError, match=r"--set expects"):
        config_lib.parse_sets(["model.d_model"])


def test_model_name_switches_family_config_and_rejects_unknown():
    cfg = config_lib.override(Config(), {"model.name": "transformer", "model.qkv_conv": 3})
    assert cfg.model.qkv_conv == 3  # a transformer-only field exists after the switch
    with pytest.raises(ConfigError, match=r"unknown model.name 'nope'"):
        config_lib.override(Config(), {"model.name": "nope"})


def test_validate_relations():
    with pytest.raises(ConfigError, match="grad_accum"):
        dataclasses.replace(
            Config(), train=dataclasses.replace(Config().train, batch_size=10, grad_accum=3)
        ).validate()
    with pytest.raises(ConfigError, match="one -1"):
        config_lib.override(Config(), {"mesh.shape": (-1, -1, 1)}).validate()


def test_json_round_trip(tmp_path):
    cfg = config_lib.load_experiment(str(ROOT / "experiments/quickstart.py"))
    config_lib.save_json(cfg, tmp_path / "config.json")
    assert config_lib.load_json(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_loads_and_validates(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Every experiment file declares its variants; every one of them loads and validates.
    assert module.VARIANTS, f"{path} declares no VARIANTS"
    for arg in module.VARIANTS:
        cfg = config_lib.load_experiment(f"{path}:{arg}" if arg else str(path))
        assert cfg.validate() is cfg
        run_lib.resolve(cfg) if cfg.data.tokenizer == "bytes" else data.check_config(cfg)
    with pytest.raises(ConfigError):
        config_lib.load_experiment(f"{path}:no-such-variant")
    # Sweeps: every run's config validates and its model builds (abstractly; once for each
    # distinct model config: mqar's 200 runs have 39).
    sweep_args = list(module.SWEEPS) if hasattr(module, "get_sweep") else []
    assert sweep_args or not hasattr(module, "get_sweep"), f"{path} declares no SWEEPS"
    built = set()
    for arg in sweep_args:
        for cfg in module.get_sweep(arg):
            cfg = config_lib.with_family_config(cfg).validate()
            model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 258)
            if model not in built:
                nnx.eval_shape(lambda m=model: models.build(m, nnx.Rngs(0)))
                built.add(model)


def test_cli_config_errors_exit_2(capsys):
    exp = str(ROOT / "experiments/quickstart.py:smoke")
    assert main(["train", exp, "--set", "model.d_modle=3"]) == 2
    err = capsys.readouterr().err
    assert "model.d_model" in err and "Traceback" not in err
    assert main(["train", exp, "--set", "train.steps=1.5"]) == 2
    assert main(["train", "experiments/missing.py"]) == 2
    assert main(["train", exp, "--print-config", "--set", "model.d_model=48"]) == 0
    assert '"d_model": 48' in capsys.readouterr().out


def test_sections_nest_and_old_keys_point_to_the_new_ones(tmp_path):
    cfg = config_lib.override(
        Config(), {"data.decompose.cycles": 3, "data.mqar.train_lengths": [16, 32]}
    )
    assert cfg.data.decompose.cycles == 3 and cfg.data.mqar.train_lengths == (16, 32)
    assert "data.decompose.max_log2_len" in config_lib.all_keys(cfg)
    with pytest.raises(ConfigError, match="'data.cycles' is now 'data.decompose.cycles'"):
        config_lib.override(Config(), {"data.cycles": 2})
    with pytest.raises(ConfigError, match="did you mean 'data.mqar.vocab'"):
        config_lib.override(Config(), {"data.mqar.vocabb": 2})
    # A config.json written before the sections existed still loads, at the new places.
    old = config_lib.to_dict(Config())
    for sec in ("decompose", "mqar"):
        del old["data"][sec]
    old["data"].update(min_log2_len=5, curriculum="shrink", mqar_vocab=64, num_kv_pairs=3)
    (tmp_path / "config.json").write_text(json.dumps(old))
    back = config_lib.load_json(tmp_path / "config.json")
    assert (back.data.decompose.min_log2_len, back.data.decompose.curriculum) == (5, "shrink")
    assert (back.data.mqar.vocab, back.data.mqar.num_kv_pairs) == (64, 3)


def test_a_key_of_another_family_says_which_families_have_it(capsys):
    with pytest.raises(
        ConfigError,
        match=r"model.state_size belongs to s4d/h3/mamba2/hybrid \(as model.ssm.state_size\)",
    ):
        config_lib.override(Config(), {"model.state_size": 8})
    # The same key after choosing a family that has it is fine, in either order of --set.
    both = {"model.state_size": 8, "model.name": "mamba2"}
    assert config_lib.override(Config(), both).model.state_size == 8
    exp = str(ROOT / "experiments/quickstart.py:smoke")
    assert main(["train", exp, "--set", "model.feature_dim=8"]) == 2
    err = capsys.readouterr().err
    assert "model.feature_dim belongs to based/retnet/lightning/gla/hybrid (as model.linear." in err
    assert "set model.name first" in err and "Traceback" not in err


def test_cli_chooses_one_cpu_device_per_core_before_jax_starts(tmp_path):
    """`lmtrain` sets --xla_force_host_platform_device_count before anything imports jax's
    backend (a regression once the parser's imports pulled jax in first)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = (
        "from lmtrain.cli import main\n"
        "main(['train', 'missing.py'])\nimport jax\nprint('devices', jax.device_count())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    cores = os.cpu_count() or 1
    want = max(n for n in (1, 2, 4, 8) if n <= cores)
    assert f"devices {want}" in out.stdout, out.stdout + out.stderr


def test_set_accepts_booleans_in_any_case_and_integral_floats_for_ints():
    sets = config_lib.parse_sets(["train.progress=false", "train.steps=1e3", "eval.lengths=[]"])
    cfg = config_lib.override(Config(), {**sets, "train.log_every": 2.0})
    assert cfg.train.progress is False and cfg.train.steps == 1000 and cfg.train.log_every == 2
    assert type(cfg.train.steps) is int
    assert config_lib.override(Config(), {"train.progress": "True"}).train.progress is True
    for key, bad in [("train.steps", 1.5), ("train.progress", "no"), ("train.steps", "1e3")]:
        with pytest.raises(ConfigError, match=key):
            config_lib.override(Config(), {key: bad})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("optim.name", "sgdx", "optim.name 'sgdx' is unknown; valid: adamw, lion, muon"),
        ("optim.schedule", "linearx", "optim.schedule 'linearx' is unknown; valid: cosine"),
        ("model.name", "foo", "unknown model.name 'foo'"),
        ("model.dtype", "fp8", "model.dtype must be one of float32, bfloat16, float16"),
        ("data.packing", "zip", "data.packing must be one of"),
        # with the default packing="concat", where the curriculum is unused: still a typo
        ("data.decompose.curriculum", "linear", "data.decompose.curriculum must be one of"),
    ],
)
def test_impossible_names_are_refused_when_the_config_is_built(key, value, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.override(Config(), {key: value}).validate()


def test_config_file_json_or_yaml_whole_or_partial(tmp_path, capsys):
    import argparse

    from lmtrain.cli.run import train_workdir

    (tmp_path / "small.yaml").write_text(
        "model:\n  d_model: 48\ntrain:\n  steps: 3\n  progress: false\n"
    )
    whole = config_lib.to_dict(config_lib.override(Config(), {"optim.lr": 0.002}))
    (tmp_path / "whole.json").write_text(json.dumps(whole))
    for name, check in [
        ("small.yaml", lambda c: c["model"]["d_model"] == 48 and c["train"]["steps"] == 3),
        ("whole.json", lambda c: c["optim"]["lr"] == 0.002),
    ]:
        assert main(["train", "--config", str(tmp_path / name), "--print-config"]) == 0
        assert check(json.loads(capsys.readouterr().out))
    args = argparse.Namespace(workdir=None, config_json=None, config=str(tmp_path / "small.yaml"))
    assert train_workdir(args) == Path("runs/small")

    bad = {
        "typo.yaml": ("model:\n  d_modle: 48\n", "d_modle"),
        "broken.yaml": ("model: [1,\n", "is not valid YAML"),
        "broken.json": ('{"model": ', "is not valid JSON"),
        "list.yaml": ("- 1\n- 2\n", "must hold a mapping of sections, not a list"),
        "conf.toml": ("[model]\n", "must be .json, .yaml or .yml"),
        "type.yaml": ("train:\n  steps: many\n", "train.steps must be int"),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        assert main(["train", "--config", str(tmp_path / name), "--print-config"]) == 2
        assert message in capsys.readouterr().err, name
    # a YAML file given to --config-json is an error with exit 2, not a traceback
    assert main(["train", "--config-json", str(tmp_path / "small.yaml"), "--print-config"]) == 0
    capsys.readouterr()
    assert main(["train", "--config-json", str(tmp_path / "broken.yaml"), "--print-config"]) == 2
    two = ["train", "experiments/quickstart.py", "--config", str(tmp_path / "small.yaml")]
    assert main(two) == 2 and "(one)" in capsys.readouterr().err
