"""Tracking URIs: the default one, the schemes MLflow takes, and a check in seconds that the store answers.

:func:`check_tracking_uri` runs before a run folder or a tracked run exists (``run.py``) and before
the first MLflow client of a store is made: an unknown scheme is a :class:`~medtricks.errors.ConfigError`
listing the supported ones, and a server or database that does not answer within ``timeout`` seconds
is a :class:`~medtricks.tracking.base.TrackingUnavailableError` -- one line each, instead of MLflow's
two minutes of database retries and a driver traceback. Nothing here imports mlflow.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import urllib.error
import urllib.request
from typing import Optional
from urllib.parse import SplitResult, urlsplit

from medtricks.errors import ConfigError
from medtricks.tracking.base import TrackingUnavailableError

__all__ = [
    "default_tracking_uri",
    "check_tracking_uri",
    "uri_scheme",
    "check_scheme",
    "SUPPORTED_SCHEMES",
    "CHECK_TIMEOUT_S",
]

#: Seconds a server or database has to answer the check (a TCP connect, then one request or login).
CHECK_TIMEOUT_S = 5.0

#: Scheme -> what it is, in the words of the error that lists them (MLflow's tracking-store schemes).
SUPPORTED_SCHEMES = {
    "sqlite": "sqlite:///PATH.db (a local database file)",
    "file": "file:///FOLDER or a plain folder path",
    "http": "http://HOST:PORT (an MLflow tracking server)",
    "https": "https://HOST (an MLflow tracking server)",
    "postgresql": "postgresql://USER:PASSWORD@HOST:PORT/DB",
    "mysql": "mysql://USER:PASSWORD@HOST:PORT/DB",
    "mssql": "mssql://USER:PASSWORD@HOST:PORT/DB",
    "databricks": "databricks (also databricks-uc, uc)",
    "databricks-uc": "",
    "uc": "",
}
_DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
_FIX = "start the server, fix tracking.uri / MLFLOW_TRACKING_URI, or run with --set tracking.backend=none"


def default_tracking_uri(uri: Optional[str] = None) -> str:
    """Recipe value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the cwd."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def uri_scheme(uri: str) -> str:
    """The store kind of a tracking URI: ``postgresql+psycopg://`` -> ``postgresql``; a plain path
    (``mlruns``, ``C:\\mlruns``) -> ``""``."""
    if uri in ("databricks", "databricks-uc", "uc") or uri.startswith(("databricks://", "databricks-uc://")):
        return uri.split(":", 1)[0]
    scheme = urlsplit(uri).scheme
    if len(scheme) == 1:  # a Windows drive letter: a folder
        return ""
    return scheme.split("+", 1)[0].lower()


def _supported() -> str:
    return "; ".join(text for text in SUPPORTED_SCHEMES.values() if text)


def check_scheme(uri: str) -> str:
    """The scheme of ``uri`` (see :func:`uri_scheme`); an unknown one is a :class:`ConfigError` that lists
    the supported ones (no network)."""
    scheme = uri_scheme(uri)
    if scheme not in SUPPORTED_SCHEMES and scheme != "":
        raise ConfigError(
            f"tracking URI {_redacted(uri)!r}: unknown scheme {scheme + '://'!r}; MLflow takes {_supported()}"
        )
    return scheme


def check_tracking_uri(uri: Optional[str] = None, *, timeout: float = CHECK_TIMEOUT_S) -> str:
    """Refuse, in at most about ``timeout`` seconds per step, a tracking URI MLflow cannot use: an unknown
    scheme (:class:`ConfigError`) or a server / database that does not answer
    (:class:`TrackingUnavailableError`). Local stores (sqlite, folders) and databricks pass unchecked
    (the first MLflow call reports their problems). Returns the URI checked (the default filled in)."""
    uri = default_tracking_uri(uri)
    scheme = check_scheme(uri)
    if scheme in ("", "file", "sqlite", "databricks", "databricks-uc", "uc"):
        return uri
    parts = urlsplit(uri)
    if scheme in ("http", "https"):
        _check_http(uri, parts, timeout)
    else:
        _check_database(uri, parts, scheme, timeout)
    return uri


def _unreachable(uri: str, why: str) -> TrackingUnavailableError:
    return TrackingUnavailableError(f"MLflow tracking URI {_redacted(uri)!r} is not reachable: {why}; {_FIX}")


def _redacted(uri: str) -> str:
    """The URI without a password (database URIs carry one)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _port(uri: str, parts: SplitResult, default: int) -> int:
    try:
        return parts.port or default
    except ValueError:  # "host:abc", "host:99999"
        raise ConfigError(f"tracking URI {_redacted(uri)!r}: the port is not a number in 1..65535") from None


def _connect(uri: str, host: str, port: int, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.timeout:
        raise _unreachable(uri, f"no answer from {host}:{port} within {timeout:g} s") from None
    except socket.gaierror as err:
        raise _unreachable(uri, f"host {host!r} is not known ({err.strerror or err})") from None
    except OSError as err:
        raise _unreachable(uri, f"{host}:{port}: {err.strerror or err}") from None


def _check_http(uri: str, parts: SplitResult, timeout: float) -> None:
    """A TCP connect, then one request to the server's ``/health``: any HTTP answer below 500 passes (a
    proxy may not route ``/health``; MLflow's own first call reports what else is wrong)."""
    if not parts.hostname:
        raise ConfigError(f"tracking URI {uri!r} names no host (expected {SUPPORTED_SCHEMES[parts.scheme]})")
    if not _proxied(parts.hostname):
        _connect(uri, parts.hostname, _port(uri, parts, 443 if parts.scheme == "https" else 80), timeout)
    context = None
    if parts.scheme == "https" and os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        context = ssl._create_unverified_context()  # noqa: S323 - the user's own MLflow setting
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout, context=context):
            pass
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise _unreachable(uri, f"the server answers HTTP {err.code} ({err.reason})") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise _unreachable(uri, f"no HTTP answer within {timeout:g} s") from None
        if isinstance(reason, ssl.SSLError):
            raise _unreachable(
                uri,
                f"TLS failed ({reason}); for a self-signed certificate set "
                "MLFLOW_TRACKING_INSECURE_TLS=true or MLFLOW_TRACKING_SERVER_CERT_PATH",
            ) from None
        raise _unreachable(uri, f"{type(reason).__name__}: {reason}") from None


def _proxied(host: str) -> bool:
    """True when an HTTP(S) proxy from the environment carries requests to ``host`` (no direct connect)."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get("http") or proxies.get("https")) and not urllib.request.proxy_bypass(host)


def _check_database(uri: str, parts: SplitResult, scheme: str, timeout: float) -> None:
    """A TCP connect to HOST:PORT (no host: a local socket), then a login with the driver's own timeout,
    so a wrong password or a missing driver is one line in seconds, not MLflow's two minutes of retries."""
    if parts.hostname:
        _connect(uri, parts.hostname, _port(uri, parts, _DATABASE_PORTS[scheme]), timeout)
    if scheme == "mssql":
        return  # drivers differ in how they take a timeout: MLflow's first call reports the rest
    _login(uri, scheme, timeout)


def _login(uri: str, scheme: str, timeout: float) -> None:
    try:
        import sqlalchemy
    except ImportError:  # pragma: no cover - MLflow depends on it
        return
    try:
        engine = sqlalchemy.create_engine(
            uri, connect_args={"connect_timeout": max(2, int(timeout))}, poolclass=sqlalchemy.pool.NullPool
        )
    except (ImportError, ModuleNotFoundError) as err:
        raise ConfigError(
            f"tracking URI {_redacted(uri)!r}: the {scheme} driver is not installed ({err}); "
            f"install it (e.g. pip install 'medtricks[server]') or name the driver in the scheme, "
            f"e.g. {scheme}+psycopg://"
        ) from None
    except Exception as err:  # noqa: BLE001 - a URI SQLAlchemy cannot parse
        raise ConfigError(
            f"tracking URI {_redacted(uri)!r} is not a database URI SQLAlchemy reads: "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from None
    outcome: dict = {}

    def login() -> None:
        try:
            with engine.connect():
                pass
        except Exception as err:  # noqa: BLE001 - reported below, one line
            outcome["error"] = err

    worker = threading.Thread(target=login, daemon=True, name="medtricks-tracking-check")
    worker.start()
    worker.join(timeout + 1.0)  # the driver's connect_timeout should end it first; never wait much longer
    engine.dispose()
    if worker.is_alive():
        raise _unreachable(uri, f"the {scheme} server did not finish a login within {timeout:g} s")
    if "error" in outcome:
        err = outcome["error"]
        detail = getattr(err, "orig", None) or err
        raise _unreachable(uri, f"{scheme} login failed: {type(detail).__name__}: {_first_line(detail)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
