"""The CBS paper's published starting configurations, with where each number comes from.

These are the top-1 configurations of Halfon et al.'s coverage-based ranking as reported in a
secondary source; they have not been checked against the paper itself, so quote them as such.
The paper's grid also varied the LR scheduler; the source gives none, so tunelab's default stays.
"""

from __future__ import annotations

from typing import Any

from tunelab.errors import TunelabError

SOURCE = (
    "Halfon et al. 2024, 'Stay Tuned: An Empirical Study of the Impact of Hyperparameters on LLM Tuning "
    "in Real-World Applications' (arXiv 2407.18990), top-1 configuration as reported in a secondary source"
)

# (model, method) -> configs, best first; batch_size is the effective batch (per device × accum × devices)
_PUBLISHED: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("mistral-7b", "full"): [{"lr": 5e-6, "batch_size": 8, "epochs": 5}],
    ("mistral-7b", "lora"): [{"lr": 5e-5, "batch_size": 32, "epochs": 5, "lora_alpha": 128, "lora_r": 128}],
    ("llama-3-8b", "full"): [{"lr": 1e-5, "batch_size": 8, "epochs": 5}],
    ("llama-3-8b", "lora"): [{"lr": 5e-5, "batch_size": 8, "epochs": 5, "lora_alpha": 32, "lora_r": 128}],
}
# the base models the paper tuned (Hugging Face ids), for reference
HUB_IDS = {"mistral-7b": "mistralai/Mistral-7B-v0.3", "llama-3-8b": "meta-llama/Meta-Llama-3-8B"}


def published_configs(model: str, method: str) -> list[dict[str, Any]]:
    """The published configs for `model` (mistral-7b, llama-3-8b) and `method` (full, lora), best first.

    Each dict holds model, method, lr, batch_size (effective), epochs, lora_r/lora_alpha for LoRA,
    and source.
    """
    models = sorted({m for m, _ in _PUBLISHED})
    methods = sorted({m for _, m in _PUBLISHED})
    if model.lower() not in models:
        raise TunelabError(
            f"no published CBS configs for model '{model}'; choose one of: {', '.join(models)}"
        )
    if method.lower() not in methods:
        raise TunelabError(
            f"no published CBS configs for method '{method}'; choose one of: {', '.join(methods)}"
        )
    key = (model.lower(), method.lower())
    return [{"model": key[0], "method": key[1], **config, "source": SOURCE} for config in _PUBLISHED[key]]


def to_train_config(published: dict[str, Any]) -> dict[str, Any]:
    """A published config as a tunelab config mapping (merge it into a base config or pass it to validate).

    The effective batch goes into train.batch_size with grad_accum 1; if it does not fit in memory,
    split it (e.g. batch_size 32 -> batch_size 8, grad_accum 4): the effective batch is what matters.
    """
    train = {
        "lr": published["lr"],
        "batch_size": published["batch_size"],
        "grad_accum": 1,
        "epochs": published["epochs"],
    }
    if published["method"] == "lora":
        method = {"name": "lora", "r": published["lora_r"], "alpha": published["lora_alpha"]}
    else:
        method = {"name": "full"}
    return {"method": method, "train": train}
