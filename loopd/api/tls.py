"""The API's TLS: a server ``SSLContext`` from ``api.tls``, rebuilt on reload.

``ServerTls.reload()`` builds a whole new context from the files (certificate, key and
client CA, each read once) and only then replaces ``context``: a file that fails keeps
the context before, and a client CA removed from the file is no longer trusted (a
context can gain CAs, never lose them, so it is never changed in place). The daemon then
listens again with the new context (``Daemon.reload``): connections accepted afterwards
get the new certificate, connections already open keep theirs. With ``client_ca`` the
context requires a client certificate signed by that CA (mutual TLS); a client without
one fails the handshake. TLS 1.2 is the least version accepted.
"""

from __future__ import annotations

import ssl

from loopd.config import TlsConfig
from loopd.errors import ConfigError


class ServerTls:
    """The SSL context of the API's site and the files it came from."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self.context = _build(config)

    def reload(self) -> str | None:
        """Build the context again; an error (returned) keeps the one built before."""
        try:
            self.context = _build(self.config)
        except ConfigError as exc:
            return str(exc)
        return None


def _build(cfg: TlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cfg.cert, cfg.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load certificate {cfg.cert} with key {cfg.key}: "
                          f"{_reason(exc)}", origin="api.tls") from None
    if cfg.client_ca is not None:
        try:
            context.load_verify_locations(cafile=cfg.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load client_ca {cfg.client_ca}: {_reason(exc)}",
                              origin="api.tls") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
