"""Fail fast without a network: probe the Hugging Face hub before a download, and when it cannot
be reached, run the download in huggingface_hub's offline mode (cached files still load; a
missing file fails at once instead of after minutes of retries).

    with offline_if_unreachable() as unreachable:
        module = timm.create_model(name, pretrained=True)   # raises at once if not cached
    # on an error: failure_reason(err, unreachable, "the file") says why

The probe is one TCP connection to the hub's host (HF_ENDPOINT, default huggingface.co:443),
2 s at most, done once per process. It is skipped (the hub counts as reachable) when the user
set HF_HUB_OFFLINE themselves or routes through a proxy (HTTPS_PROXY), where a direct
connection says nothing. huggingface_hub's own offline flag is restored on leaving, and so is
the root logger (open_clip logs each failed download there; the error says it once).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0
_reachable: dict[str, bool] = {}  # host:port -> probe result, once per process


def hub_address() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds (cached per process)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host, port = hub_address()
    key = f"{host}:{port}"
    if key not in _reachable:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _reachable[key] = True
        except OSError:
            _reachable[key] = False
    return _reachable[key]


@contextmanager
def offline_if_unreachable(enabled: bool = True) -> Iterator[bool]:
    """Yields whether the hub was found unreachable; if so, huggingface_hub is offline inside.
    `enabled=False` (nothing comes from the hub: a local file or folder): no probe, yields False."""
    if not enabled:
        yield False
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield False
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    root = logging.getLogger()
    root.addFilter(_quiet_download_errors)  # open_clip logs each failed download on the root logger
    try:
        yield True
    finally:
        root.removeFilter(_quiet_download_errors)
        constants.HF_HUB_OFFLINE = saved


def _quiet_download_errors(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "download" in record.getMessage().lower())


def failure_reason(err: BaseException, unreachable: bool, what: str) -> str:
    """Why a download failed, for an error message: the unreachable hub (`what` is not in the
    local cache) when the probe said so, else the library's own error."""
    if not unreachable:
        return f"{type(err).__name__}: {err}"
    host, port = hub_address()
    return (f"the Hugging Face hub ({host}:{port}) cannot be reached from this machine and {what} "
            "is not in the local cache")
