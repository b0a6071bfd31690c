"""Models and evaluations to and from the outside world.

hf.py               parameter and config maps to Hugging Face transformers (Llama, Mamba-2)
                    and lmtrain's own safetensors format
export.py           `lmtrain export` (a checkpoint to either format) and `model.init_from`
lm_eval_adapter.py  lm-evaluation-harness's LM interface on the JAX model (`lmtrain lm-eval`)
"""
