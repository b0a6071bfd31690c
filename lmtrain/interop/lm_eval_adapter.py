"""lm-evaluation-harness on the JAX model: an `lm_eval.api.model.LM` adapter (`lmtrain lm-eval`).

Every family works (nothing is exported): requests are scored by the model's own forward pass
and generated with its own decode cache. The conventions are those of lm-eval's `hf` backend,
so its numbers on an exported model are this adapter's numbers:

- no BOS; an empty context is conditioned on the end-of-document token (lm-eval's
  `prefix_token_id` falls back to EOS when there is no BOS);
- `max_length` is the run's `data.seq_len`; a longer context + continuation keeps its last
  max_length + 1 tokens (the input is all but the last);
- rolling loglikelihoods use lm-eval's own disjoint windows of max_length tokens;
- generation is greedy unless a task asks to sample, stops at EOS or a stop string, and keeps
  the last max_length - max_gen_toks tokens of the context.

Shapes: score batches are padded on the right to `batch_size` rows and to the next power of two
in length (at most max_length), so a whole evaluation compiles a handful of programs; generation
feeds one token at a time into a cache of max_length tokens (one program).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtrain.errors import ConfigError


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise ConfigError(
            "lmtrain lm-eval needs the lm-eval extra: pip install 'lmtrain[lm-eval]'"
        ) from None
    return TemplateLM


def make_adapter(run: Any, params: Any, batch_size: int = 8):
    """An lm_eval LM over (run, params)."""
    TemplateLM = _lm_eval()
    from lm_eval import utils
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    graphdef = run.graphdef
    max_length = run.cfg.data.seq_len
    eod = run.tokenizer.eod_id

    @jax.jit
    def score(params, tokens_BxL, targets_BxL):
        """log p(target) at every position and whether the target is the argmax (only these
        B x L numbers leave the device, not the B x L x V log-probabilities)."""
        logits_BxLxV = nnx.merge(graphdef, params)(tokens_BxL)
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
        logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
        return logp_BxL, jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL

    @jax.jit
    def step(params, token_1x1, cache):
        logits, cache = nnx.merge(graphdef, params).decode(token_1x1, cache)
        return logits[:, -1], cache

    class LmtrainLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.batch_size_per_gpu = batch_size
            self.max_length, self.max_gen_toks = max_length, 256
            self.requests_scored = 0

        @property
        def eot_token_id(self) -> int:
            return eod

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return run.tokenizer.encode(string)

        def tok_decode(self, ids) -> str:
            return run.tokenizer.decode(ids)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            """(sum of continuation log-probs, whether greedy decoding gives it) per request."""
            rows = []
            for _, context_enc, continuation_enc in requests:
                if not continuation_enc:
                    raise ConfigError("an lm-eval request has an empty continuation")
                if len(continuation_enc) > max_length:
                    # (the hf backend stops here too, on an assert)
                    need = 1 << (len(continuation_enc) - 1).bit_length()
                    raise ConfigError(
                        f"an lm-eval request's continuation is {len(continuation_enc)} tokens, "
                        f"longer than the model's context (data.seq_len={max_length}); "
                        f"evaluate at a longer context with --set data.seq_len={need} (a "
                        "model trained at one length may do worse at another), or choose "
                        "tasks with shorter continuations"
                    )
                full = (list(context_enc) + list(continuation_enc))[-(max_length + 1) :]
                rows.append((full, len(continuation_enc)))
            out: list[tuple[float, bool]] = [None] * len(rows)  # type: ignore[list-item]
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                length = _bucket(max(len(rows[i][0]) - 1 for i in chunk), max_length)
                tokens = np.full((batch_size, length + 1), eod, np.int32)
                for r, i in enumerate(chunk):
                    tokens[r, : len(rows[i][0])] = rows[i][0]
                inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
                logp, greedy = jax.device_get(score(params, inputs, targets))
                for r, i in enumerate(chunk):
                    n, c = len(rows[i][0]) - 1, rows[i][1]
                    lp, ok = logp[r, n - c : n], greedy[r, n - c : n]
                    out[i] = (float(lp.sum(dtype=np.float64)), bool(ok.all()))
            self.requests_scored += len(rows)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for (string,) in [req.args for req in requests]:
                windows = map(
                    utils.make_disjoint_window,
                    utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=max_length,
                        context_len=1,
                    ),
                )
                scored = self._loglikelihood_tokens([(None, *w) for w in windows])
                totals.append(sum(lp for lp, _ in scored))
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            eos = run.tokenizer.decode([eod]) or None
            results = []
            for context, gen_kwargs in [req.args for req in requests]:
                kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
                until = handle_stop_sequences(kw.pop("until", None), eos=eos)
                max_gen = int(kw.pop("max_gen_toks"))
                if kw.get("do_sample") and kw.get("temperature", 0) > 0:
                    raise ConfigError("lmtrain lm-eval generates greedily; a task asked to sample")
                if max_gen >= max_length:
                    raise ConfigError(f"max_gen_toks {max_gen} >= the model's context {max_length}")
                ids = self.tok_encode(context)[-(max_length - max_gen) :] or [eod]
                results.append(self._greedy(ids, max_gen, [u for u in until if u]))
            return results

        def _greedy(self, ids: list[int], max_gen: int, until: list[str]) -> str:
            model = nnx.merge(graphdef, params)
            cache = model.init_state(1, max_length)
            for t in ids[:-1]:
                _, cache = step(params, jnp.asarray([[t]], jnp.int32), cache)
            token, out = ids[-1], []
            for _ in range(max_gen):
                logits, cache = step(params, jnp.asarray([[token]], jnp.int32), cache)
                token = int(np.argmax(np.asarray(logits[0])))
                if token == eod:
                    break
                out.append(token)
                text = run.tokenizer.decode(out)
                if any(u in text for u in until):
                    break
            text = run.tokenizer.decode(out)
            for u in until:  # cut at the first stop string, as lm-eval's hf backend
                text = text.split(u)[0]
            return text

    return LmtrainLM()


def _bucket(n: int, max_length: int) -> int:
    """The padded length of a batch whose longest row has n tokens: a power of two (>= 16)."""
    b = 16
    while b < n:
        b *= 2
    return min(b, max_length) if n <= max_length else n


def _task_manager(TaskManager, tasks: list[str], include_path: str | None):
    """lm-eval's task index. Indexing its ~15k bundled YAMLs takes 15-25 s a call here; where
    every requested name is a plain task of --include-path, the local index alone serves."""
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        kinds = {name: _kind(entry) for name, entry in local.task_index.items()}
        if all(kinds.get(t) == "task" for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def _kind(entry) -> str:
    """The kind ("task", "group", ...) of an index entry (an Entry with .kind in recent lm_eval, a
    dict with "type" in older ones)."""
    kind = entry["type"] if isinstance(entry, dict) else entry.kind.name
    return str(kind).lower()


def evaluate(
    workdir: Path,
    tasks: list[str],
    *,
    include_path: str | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    step: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    overrides: dict | None = None,
) -> tuple[dict, str]:
    """(lm-eval's results dict, its printed table) for a checkpoint of `workdir`; `overrides`
    are --set's."""
    _lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from lmtrain import run as run_lib

    if batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    run, params, s = run_lib.restore_params(Path(workdir), overrides, step=step)
    manager = _task_manager(TaskManager, tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown lm-eval task(s) {', '.join(unknown)}"
            + ("" if include_path else "; local task YAMLs need --include-path DIR")
        )
    adapter = make_adapter(run, params, batch_size)
    results = lm_eval.simple_evaluate(
        model=adapter,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=True,
    )
    results["lmtrain"] = {"workdir": str(workdir), "step": s, "model": run.cfg.model.name}
    table = make_table(results)
    return results, table
