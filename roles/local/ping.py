"""Healthchecks-style pings: ``URL/start`` before a pull, ``URL`` after a good one,
``URL/fail`` (the reason in the body) after a failed one.

A ping is best effort: it never changes a backup's result. A ping that fails (no answer
within ``TIMEOUT`` seconds, a refused connection, an HTTP error) returns one line saying
so, which the backup prints as a warning. Only the URL from the inventory is contacted;
redirects are not followed to other schemes than http(s) (urllib's default handlers).
"""

from __future__ import annotations

TIMEOUT = 10.0  # seconds per ping; a backup waits at most this long for a monitor
MAX_BODY = 10_000  # healthchecks.io keeps the first 100 kB; a reason is one line


def ping_url(base: str, event: str) -> str:
    """Pure: the URL of ``event`` (``start``, ``success``, ``fail``) below ``base``."""
    base = base.rstrip("/")
    return base if event == "success" else f"{base}/{event}"


def send_ping(base: str, event: str, body: str = "", timeout: float = TIMEOUT) -> str | None:
    """POST ``body`` to the event's URL; None when the monitor answered 2xx, else why not."""
    # Deferred: urllib.request (http.client, email, ssl) is the start-up's largest standard
    # import (docs/performance.md); only runs whose hosts have a monitor.ping_url pay it.
    import urllib.error
    import urllib.request

    url = ping_url(base, event)
    if not url.startswith(("http://", "https://")):  # the inventory checks it too
        return f"ping {url} not sent: only http:// and https:// URLs are pinged"
    request = urllib.request.Request(url, data=body.encode()[:MAX_BODY],  # noqa: S310
                                     method="POST", headers={"User-Agent": "pullback"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        return f"ping {url} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"ping {url} failed: {reason}"
    if not 200 <= status < 300:
        return f"ping {url} answered HTTP {status}"
    return None
