"""TLS credentials for the gRPC server, re-read when their files change.

gRPC asks `ReloadingCertificates.fetch` for the certificate configuration at each new TLS handshake (on one
of its threads); it compares the files' modification times and sizes, and only when they changed reads them
again. A rotated certificate (a Kubernetes Secret update, cert-manager) so takes effect for new connections
without a restart, and a broken or half-written file keeps the last good certificate serving.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import grpc

from sidecar.config import TlsConfig
from sidecar.errors import ConfigError
from sidecar.logs import get_logger

log = get_logger("sidecar.tls")


class ReloadingCertificates:
    """Server credentials from `config`'s files; ``credentials()`` for ``add_secure_port``."""

    def __init__(self, config: TlsConfig):
        self.config = config
        self._files = [Path(p) for p in (config.cert_file, config.key_file, config.client_ca_file) if p]
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        try:
            self._current = self._read()
        except (OSError, ValueError) as e:
            raise ConfigError("server.tls", f"cannot read the certificate files ({e})") from None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._current, self.fetch, require_client_authentication=self.config.client_ca_file is not None)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed and read well; None keeps the one in use."""
        stamp = self._stamps()
        with self._lock:
            if stamp == self._stamp:
                return None
            try:
                fresh = self._read()
            except (OSError, ValueError) as e:
                log.error("tls_reload_failed", error=type(e).__name__)  # the old certificate keeps serving
                return None
            self._stamp, self._current = stamp, fresh
        log.info("tls_reloaded", cert_file=self.config.cert_file)
        return fresh

    def _read(self) -> grpc.ServerCertificateConfiguration:
        chain = Path(self.config.cert_file).read_bytes()
        key = Path(self.config.key_file).read_bytes()
        if b"-----BEGIN" not in chain or b"-----BEGIN" not in key:
            raise ValueError("not PEM")
        roots = Path(self.config.client_ca_file).read_bytes() if self.config.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        out = []
        for path in self._files:
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((-1, -1))
        return tuple(out)
