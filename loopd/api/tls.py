"""The API's TLS: one server ``SSLContext`` from ``api.tls``, its certificate reloadable.

``ServerTls.reload()`` loads the certificate chain again into the same context: the
listening socket keeps it, and every connection accepted afterwards is handshaken with
the new certificate (connections already open keep theirs). With ``client_ca`` the
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
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load()

    def _load(self) -> None:
        cfg = self.config
        try:
            self.context.load_cert_chain(cfg.cert, cfg.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load certificate {cfg.cert} with key {cfg.key}: "
                              f"{_reason(exc)}", origin="api.tls") from None
        if cfg.client_ca is not None:
            try:
                self.context.load_verify_locations(cafile=cfg.client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load client_ca {cfg.client_ca}: {_reason(exc)}",
                                  origin="api.tls") from None
            self.context.verify_mode = ssl.CERT_REQUIRED

    def reload(self) -> str | None:
        """Read the files again; an error (returned) keeps the certificate loaded before."""
        try:
            ServerTls(self.config)  # a scratch context first: a half-loaded chain never serves
            self._load()
        except ConfigError as exc:
            return str(exc)
        return None


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
