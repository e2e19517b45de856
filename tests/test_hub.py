"""Without a network, a hub id goes to the hub cache at once, instead of a minute of retries."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from conftest import assert_one_line_error, run_cli
from tunelab.hub import PROXY_VARIABLES, offline_unless_reachable


@pytest.fixture()
def hub_at(monkeypatch):
    """Point huggingface_hub at a host (online, no proxy), and forget the last answer."""

    def point(endpoint: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        for name in PROXY_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        offline_unless_reachable.cache_clear()

    yield point
    offline_unless_reachable.cache_clear()


def test_an_unresolvable_hub_means_the_cache_only_and_the_error_comes_at_once(hub_at, capsys, tmp_path):
    hub_at("https://hub.invalid")  # .invalid never resolves (RFC 2606)
    code, err = run_cli(capsys, "data", "add:train", "model=someone/no-such-model")
    lines = err.strip().splitlines()
    assert lines[0].startswith("note: hub.invalid cannot be resolved (no network?)")
    assert_one_line_error(  # before the data loads
        code,
        "\n".join(lines[1:]),
        "model not found: someone/no-such-model is no local folder, and as a hub id it is not in the hub "
        "cache, with no hub to reach",
    )
    assert "Retrying" not in err and constants.HF_HUB_OFFLINE
    # a hub dataset id the same way, without a second note
    code, err = run_cli(capsys, "data", "someone/no-such-data")
    assert_one_line_error(code, err, "dataset 'someone/no-such-data'")


@pytest.mark.parametrize("proxy", [False, True])
def test_a_resolvable_hub_or_a_proxy_leaves_the_hub_online(hub_at, monkeypatch, capsys, proxy):
    hub_at("http://localhost" if not proxy else "https://hub.invalid")
    if proxy:  # the proxy resolves the hub's name, not this machine
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    offline_unless_reachable()
    assert not constants.HF_HUB_OFFLINE and capsys.readouterr().err == ""


def test_without_a_hub_a_model_in_its_cache_loads_and_one_not_there_is_not_found(monkeypatch, tmp_path):
    from tunelab.hub import unreachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    cached = tmp_path / "models--someone--cached"  # the hub cache's layout: a ref to a snapshot
    (cached / "snapshots" / "abc").mkdir(parents=True)
    (cached / "snapshots" / "abc" / "config.json").write_text("{}")
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("abc")
    assert not unreachable("someone/cached")
    assert unreachable("someone/absent") and unreachable("someone//cached")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # a hub to reach: anything may be there
    assert not unreachable("someone/absent")
