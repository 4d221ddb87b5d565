"""Access control: which Host names are answered, the API key, and the one folder clients may load runs from."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from ..errors import ConfigError, LightuneError, ModelError
from .registry import AdapterRegistry, ServedAdapter, adapter_name_for


class AccessDenied(LightuneError):
    """A request that the server's access settings refuse (HTTP 403)."""


class AdapterRoot:
    """The one folder whose runs clients may load at run time (`--allow-adapter-loading ROOT`).

    A client names a run relative to it, or by an absolute path inside it. Paths are resolved (symlinks followed)
    before the check, and errors name a run as the client did, never by a path of the server."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise ConfigError(f"--allow-adapter-loading: {path} is not a directory")

    def locate(self, sent: str) -> Path:
        """The run directory a client named; AccessDenied for one outside the root or with links out of it."""
        run_dir = (self.path / sent).resolve()  # an absolute `sent` replaces the root, `..` climbs out of it
        if not run_dir.is_relative_to(self.path):
            raise AccessDenied(f"run_dir {sent!r} is outside the folder runs may be loaded from")
        try:
            self._check_links(run_dir, sent)
        except OSError as exc:
            raise ModelError(f"cannot read run_dir {sent!r}: {exc.strerror or exc}") from None
        return run_dir

    def _check_links(self, run_dir: Path, sent: str) -> None:
        """What loading reads (the run's files and those of its folders) must not link out of the root either."""
        if not run_dir.is_dir():
            return  # check_run says it is missing
        for entry in run_dir.iterdir():
            for path in (entry, *(entry.iterdir() if entry.is_dir() else ())):
                if not path.resolve().is_relative_to(self.path):
                    raise AccessDenied(f"run_dir {sent!r} links outside the folder runs may be loaded from "
                                       f"({path.relative_to(run_dir)})")

    def add(self, registry: AdapterRegistry, name: str | None, sent: str) -> ServedAdapter:
        """Check and load the run a client named, under `name` (default: the run directory's name)."""
        run_dir = self.locate(sent)
        return registry.add_checked(registry.check_run(name or adapter_name_for(run_dir), run_dir, shown=sent))


LOOPBACK_NAMES = ["localhost", "127.0.0.1", "[::1]"]


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def trusted_hosts(bind_host: str, extra: list[str] | None = None) -> list[str] | None:
    """The Host header values to answer (None: any).

    On a loopback address only loopback names, any port, plus `extra`: a web page elsewhere cannot reach the server
    through DNS rebinding (its requests carry the page's own host name). Elsewhere `extra`, or any host."""
    extra = list(extra or [])
    for pattern in extra:
        if "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*" and not pattern.startswith("*.")):
            raise ConfigError(f"bad allowed host {pattern!r}: give a host name, '*.example.com' or '*'")
    if not is_loopback(bind_host):
        return extra or None
    own = f"[{bind_host.strip('[]')}]" if ":" in bind_host else bind_host.lower()
    return list(dict.fromkeys(LOOPBACK_NAMES + [own] + extra))


@dataclass
class Access:
    """Who may use the server, and what clients may load."""

    allowed_hosts: list[str] | None = None  # Host header values answered, as trusted_hosts gives them; None: any
    api_key: str | None = None  # needed as `Authorization: Bearer <key>` everywhere but OPEN_PATHS; None: open
    adapter_root: AdapterRoot | None = None  # POST and DELETE /adapters load from there only; None: refused


OPEN_PATHS = {"/", "/health"}  # the page (it asks for the key) and the liveness probe


def key_matches(headers: Headers, key: str) -> bool:
    """True when the request carries `Authorization: Bearer <key>` (compared in constant time)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    sent = hashlib.sha256(token.strip().encode("latin-1")).digest()  # digests: equal lengths, nothing to time
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, hashlib.sha256(key.encode()).digest())


class BearerKey:
    """ASGI middleware: 401 with `WWW-Authenticate: Bearer` for a request to a closed path without the API key."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan (startup, shutdown) has no headers; nor path to close
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if scope["path"] in OPEN_PATHS or key_matches(headers, self.key):
            return await self.app(scope, receive, send)
        detail = "wrong API key" if "authorization" in headers else \
            "this server needs an API key: send the header 'Authorization: Bearer <key>'"
        await JSONResponse({"detail": detail}, status_code=401,
                           headers={"WWW-Authenticate": 'Bearer realm="lightune"'})(scope, receive, send)
