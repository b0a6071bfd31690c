"""Models out to HF transformers and back: logits, greedy text and tokenizers against the real
library (torch CPU), import round trips, refusals."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiled_call, tiny
from flax import nnx

from lmtrain import config as config_lib
from lmtrain import run as run_lib
from lmtrain import train
from lmtrain.cli import main
from lmtrain.config import ConfigError
from lmtrain.interop import export as export_lib

PROMPT = "alpha beta gamma delta "

VARIANTS = {
    "mha-untied-bytes": {},
    "gqa-tied-bpe": {
        "model.n_kv_heads": 2,
        "model.tie_embeddings": True,
        "data.tokenizer": "bpe:300",
        "model.rope_theta": 5000.0,
        "model.norm_eps": 1e-5,
    },
    # with mamba_ssm's conv bias and init (Zoology's Mamba-2): the bias travels both ways
    "mamba2": {
        "model.name": "mamba2",
        "model.n_heads": 4,
        "model.tie_embeddings": False,
        "model.conv_bias": True,
        "model.linear_init": "torch",
    },
}


def _trained(corpus, tmp_path, **sets):
    """A 4-step run with checkpoints at steps 2 and 4."""
    wd = tmp_path / "run"
    cfg = tiny(corpus, **{"train.steps": 4, "train.checkpoint_every": 2, **sets})
    train.train(cfg, wd)
    return wd


def _lmtrain_logits(run, params, ids):
    model = nnx.merge(run.graphdef, params)
    return np.asarray(compiled_call(model, jnp.asarray([ids], jnp.int32)))[0]


def _hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_matches_transformers_logits_greedy_text_and_tokens(
    variant, corpus, tmp_path, capsys
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtrain.generate import sample_tokens

    wd = _trained(corpus, tmp_path, **VARIANTS[variant])
    out = tmp_path / "hf"
    assert main(["export", "--workdir", str(wd), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    arch = "Mamba2ForCausalLM" if variant == "mamba2" else "LlamaForCausalLM"
    assert summary["architecture"] == arch and summary["step"] == 4

    run, params, _ = run_lib.restore_params(wd)
    tok = AutoTokenizer.from_pretrained(out)
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == arch
    # Same text, same ids: no BOS added, no EOS appended, nothing normalised away.
    ids = run.tokenizer.encode(PROMPT)
    assert tok(PROMPT)["input_ids"] == ids
    assert tok.decode(ids) == PROMPT
    assert tok.eos_token_id == run.tokenizer.eod_id and tok.bos_token_id is None

    ours, theirs = _lmtrain_logits(run, params, ids), _hf_logits(hf_model, ids)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # The comparison can fail: step 2's weights give other logits than step 4's.
    _, params2, _ = run_lib.restore_params(wd, step=2)
    assert np.abs(_lmtrain_logits(run, params2, ids) - theirs).max() > 1e-3

    # Greedy continuation: transformers' generate == lmtrain generate --temperature 0.
    n = 24
    ours_ids = sample_tokens(run, params, ids, n, temperature=0.0)
    g = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0].tolist()
    theirs_ids = g[len(ids) :]
    if theirs_ids and theirs_ids[-1] == run.tokenizer.eod_id:  # HF keeps the EOS it stopped on
        theirs_ids = theirs_ids[:-1]
    assert theirs_ids == ours_ids
    assert tok.decode(theirs_ids, skip_special_tokens=True) == run.tokenizer.decode(ours_ids)

    # And back: lmtrain -> HF -> lmtrain gives the identical parameters.
    back = export_lib.load_init(f"hf:{out}", run_lib.setup(run.cfg))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow
def test_random_transformers_models_import_with_matching_logits(corpus, tmp_path, capsys):
    """A Llama (GQA, untied) and a Mamba-2 made by transformers itself start an lmtrain run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=258,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=500.0,
            tie_word_embeddings=False,
        )
    )
    mamba = Mamba2ForCausalLM(
        Mamba2Config(
            vocab_size=258,
            hidden_size=32,
            num_hidden_layers=2,
            num_heads=4,
            head_dim=16,
            expand=2,
            state_size=16,
            n_groups=1,
            conv_kernel=4,
            use_conv_bias=True,  # transformers' default, as the released checkpoints
            chunk_size=8,
        )
    )
    sets = {
        "llama": {"model.n_kv_heads": 2, "model.norm_eps": 1e-5, "model.rope_theta": 500.0},
        "mamba2": {
            "model.name": "mamba2",
            "model.n_heads": 4,
            "model.norm_eps": 1e-5,
            "model.conv_bias": True,
        },
    }
    ids = list(PROMPT.encode())
    for name, hf_model in (("llama", llama), ("mamba2", mamba)):
        d = tmp_path / name
        hf_model.eval().save_pretrained(d)
        extra = {"model.ffn_mult": 3.0} if name == "llama" else {}  # F = 64 as intermediate
        cfg = tiny(corpus, **sets[name], **extra, **{"model.init_from": f"hf:{d}"})
        run = run_lib.setup(cfg)
        params = export_lib.load_init(cfg.model.init_from, run)
        theirs = _hf_logits(hf_model, ids)
        np.testing.assert_allclose(_lmtrain_logits(run, params, ids), theirs, atol=1e-4, rtol=0)
        assert np.abs(theirs).max() > 1e-2  # not a degenerate all-zero model

        # A mismatched architecture is a clear error naming the fields.
        wrong = tiny(corpus, **sets[name], **extra, **{"model.d_model": 64})
        with pytest.raises(ConfigError, match="holds another model: model.d_model=32 there"):
            export_lib.load_init(f"hf:{d}", run_lib.setup(wrong))
    # The conv bias is part of the model: without it the logits would differ, so it is refused.
    no_bias = tiny(corpus, **{**sets["mamba2"], "model.conv_bias": False})
    with pytest.raises(ConfigError, match="--set model.conv_bias=True"):
        export_lib.load_init(f"hf:{tmp_path / 'mamba2'}", run_lib.setup(no_bias))

    # Continued pretraining from the HF Llama through the CLI: step 0 is the HF model.
    wd = tmp_path / "cont"
    cfg = tiny(corpus, **sets["llama"], **{"model.ffn_mult": 3.0, "train.steps": 2})
    cfg_file = tmp_path / "cont.json"
    cfg_file.write_text(json.dumps(config_lib.to_dict(cfg)))
    init = f"model.init_from=hf:{tmp_path / 'llama'}"
    assert main(["train", "--config", str(cfg_file), "--workdir", str(wd), "--set", init]) == 0
    assert f"fresh start from hf:{tmp_path / 'llama'}" in capsys.readouterr().err
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


@pytest.mark.slow
def test_unrepresentable_families_are_refused_and_safetensors_round_trips(corpus, tmp_path, capsys):
    wd = _trained(corpus, tmp_path, **{"model.name": "gla", "model.n_heads": 2})
    out = tmp_path / "x"
    assert main(["export", "--workdir", str(wd), "--out", str(out)]) == 2
    assert "model.name='gla' is not representable in transformers" in capsys.readouterr().err
    assert not out.exists()  # nothing half-written
    assert main(["export", "--workdir", str(wd), "--out", str(out), "--format", "safetensors"]) == 0
    capsys.readouterr()
    run, params, _ = run_lib.restore_params(wd)
    back = export_lib.load_init(str(out), run_lib.setup(run.cfg))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    # Exporting onto an existing directory is refused; so is importing into another model.
    assert main(["export", "--workdir", str(wd), "--out", str(out), "--format", "safetensors"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    other = tiny(corpus, **{"model.name": "gla", "model.n_heads": 2, "model.n_layers": 3})
    with pytest.raises(ConfigError, match="model.n_layers=2 there, 3 here"):
        export_lib.load_init(str(out), run_lib.setup(other))

    # Primer's relu2 transformer has no transformers equivalent either.
    wd2 = tmp_path / "relu2"
    train.train(tiny(corpus, **{"model.activation": "relu2", "train.steps": 2}), wd2)
    assert main(["export", "--workdir", str(wd2), "--out", str(tmp_path / "y")]) == 2
    assert "model.activation='relu2'" in capsys.readouterr().err


def test_bytes_tokenizer_json_is_lmtrains_bytes_tokenizer():
    from tokenizers import Tokenizer

    from lmtrain.data.tokenizers import ByteTokenizer

    tk = Tokenizer.from_str(export_lib.bytes_tokenizer_json())
    ours = ByteTokenizer()
    for text in ("plain ascii", "  leading spaces\tand\ttabs\n", "ünïcödé ✓ 🙂", "<|eod|> text"):
        ids = tk.encode(text, add_special_tokens=False).ids
        if "<|eod|>" not in text:
            assert ids == ours.encode(text)
            assert tk.decode(ids) == text
    assert tk.token_to_id("<|eod|>") == 256 and tk.token_to_id("<|pad|>") == 257
    assert tk.get_vocab_size() == 258


def test_options_llama_and_mamba2_lack_are_refused_by_name():
    from lmtrain import models
    from lmtrain.interop import hf

    base = models.family("transformer").Config(d_model=32, n_heads=4)
    assert hf.architecture(base) == "LlamaForCausalLM"
    assert hf.architecture(dataclasses.replace(base, zero_init=True)) == "LlamaForCausalLM"
    for change, why in [
        (dict(qk_norm=True), "QK-norm"),
        (dict(logit_softcap=15.0), "logit soft cap"),
        (dict(activation="relu2"), "model.activation='relu2'"),
    ]:
        with pytest.raises(ConfigError, match=f"{why}.*not representable in transformers"):
            hf.architecture(dataclasses.replace(base, **change))
    ssm = models.family("mamba2").Config(name="mamba2", d_model=32, n_heads=4)
    assert hf.architecture(ssm) == "Mamba2ForCausalLM"
    with pytest.raises(ConfigError, match="soft cap.*Mamba-2 has none"):
        hf.architecture(dataclasses.replace(ssm, logit_softcap=30.0))
