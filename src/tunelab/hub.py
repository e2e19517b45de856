"""Reaching the Hugging Face hub: without a network, its cache at once instead of a minute of retries."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from rich.console import Console

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@functools.cache  # once per process: the answer does not change between a model and its data
def offline_unless_reachable() -> None:
    """Call before loading a hub id. When the hub's host name does not resolve (no network) and no proxy
    would resolve it instead, huggingface_hub is put in offline mode for this process: a model or dataset
    in the hub cache loads at once and any other fails at once, where each request would otherwise be
    retried 5 times, 1 to 8 s apart (~50 s), with a warning line each."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:  # gaierror: no DNS, so no network to retry over
        # huggingface_hub reads it at each request, so transformers and datasets (which keep a copy of
        # their own from import time) get no answer from the network either, at once
        constants.HF_HUB_OFFLINE = True
        Console(stderr=True, emoji=False, soft_wrap=True, highlight=False).print(
            f"[yellow]note:[/yellow] {host} cannot be resolved (no network?): hub ids load from the local "
            "hub cache only (HF_HUB_OFFLINE)"
        )


def unreachable(repo_id: str) -> bool:
    """Whether a hub model cannot load here: the hub cannot be reached and its cache has no copy of it."""
    from huggingface_hub import constants, try_to_load_from_cache

    offline_unless_reachable()
    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # HFValidationError: no valid repo id ('a//b'), which loads from nowhere
        cached = False
    return constants.HF_HUB_OFFLINE and not cached
