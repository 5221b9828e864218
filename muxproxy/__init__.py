"""muxproxy: an edge reverse proxy that multiplexes every client request over a small, fixed
pool of persistent HTTP/2 connections per backend."""

from .config import Config, ConfigError, load, loads
from .errors import BackendError, BackendTimeout, BackendUnavailable, ClientError, ProxyError
from .io.server import Proxy

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "ClientError",
    "Config",
    "ConfigError",
    "Proxy",
    "ProxyError",
    "__version__",
    "load",
    "loads",
]
