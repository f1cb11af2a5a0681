"""Where an ablation's children train: in this process, in local worker processes, or on a Ray cluster.

Every executor takes the same list of children (``(variant, seed, recipe data, tags)``) and returns
the same ``(results, failed)`` pair, so the parent run, the resume logic and the table do not care
where a child trained. A child is always :func:`_run_child`: it trains with
``resume="auto"`` in its own run folder, so a child that is retried after its worker died continues
from its last checkpoint and its MLflow run (the run id lives in the run folder) instead of starting
a second one.

Ray (``executor="ray"``): each child is one Ray task with ``num_cpus=cpus_per_run`` and
``num_gpus=gpus_per_run``; Ray retries a task whose worker process or node died (``retries`` times,
``max_retries`` in Ray's terms); an exception raised by the training itself is not retried (it would
fail again) and is reported like a failed local child. ``address=None`` starts a local Ray on this
machine for the call and stops it afterwards; ``"auto"`` joins the cluster this machine belongs to
(``ray start --head`` / ``ray start --address ...``); ``"ray://host:10001"`` connects a Ray Client.
On a cluster the run folders (``experiment.output_dir``) and data must be on a filesystem every node
sees under the same path, and tracking must be a server (``tracking.uri: http://host:5000``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

# The module, not the function: run_recipe is looked up at call time, so a test (or a caller) that
# swaps medtricks.run.run_recipe for a stand-in trainer is used by every child.
import medtricks.run as _run
from medtricks.ablation.table_metric import metric_keys
from medtricks.errors import ConfigError
from medtricks.recipe import Recipe

__all__ = ["ExecutorSettings", "EXECUTORS", "run_children"]

EXECUTORS = ("local", "ray")
# Environment a child needs to see what the driver sees: the tracking store and its credentials,
# the patient-ID salt (the same hashes), caches and offline switches. Ray workers start from the raylet
# (or another node), not from this process, so they are given these explicitly.
_FORWARDED_ENV_PREFIXES = ("MEDTRICKS_", "MLFLOW_")
#: Seconds a Ray address has to accept a connection and answer as a gRPC server (check_reachable).
RAY_CONNECT_TIMEOUT_S = 10.0
_ADDRESS_FORMS = "'auto', 'ray://host:10001' (Ray Client) or 'host:6379' (the cluster's GCS)"


@dataclass(frozen=True)
class ExecutorSettings:
    """How children are trained.

    Attributes:
        name: ``local`` (this process, or ``jobs`` spawned worker processes) or ``ray``.
        jobs: local worker processes (``local`` only; Ray schedules by ``cpus_per_run``).
        address: Ray only: ``None`` (a local Ray started for the call), ``auto`` or ``ray://host:port``.
        cpus_per_run: Ray only: CPUs reserved per child; also its torch thread count.
        gpus_per_run: Ray only: GPUs reserved per child (Ray sets ``CUDA_VISIBLE_DEVICES``).
        retries: Ray only: how often a child whose worker died is started again (resuming).
    """

    name: str = "local"
    jobs: int = 1
    address: Optional[str] = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    retries: int = 2

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise ConfigError(f"executor must be one of {list(EXECUTORS)}, got {self.name!r}")
        if not isinstance(self.jobs, int) or isinstance(self.jobs, bool) or self.jobs < 1:
            raise ConfigError(f"jobs must be an int >= 1, got {self.jobs!r}")
        if self.name == "ray" and self.jobs != 1:
            raise ConfigError(
                f"jobs={self.jobs} is for the local executor; with executor 'ray' the cluster "
                "runs as many children at once as its CPUs/GPUs allow: set cpus_per_run "
                "(--cpus-per-run) / gpus_per_run instead"
            )
        if self.name == "local":
            changed = [
                k
                for k, v in (
                    ("address", self.address),
                    ("cpus_per_run", self.cpus_per_run != 1.0),
                    ("gpus_per_run", self.gpus_per_run != 0.0),
                    ("retries", self.retries != 2),
                )
                if v
            ]
            if changed:
                raise ConfigError(
                    f"{', '.join(changed)}: Ray-only setting(s), but the executor is 'local'; "
                    "add --executor ray or drop them"
                )
        for key in ("cpus_per_run", "gpus_per_run"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{key} must be a number >= 0, got {value!r}")
        if self.cpus_per_run <= 0 and self.gpus_per_run <= 0:
            raise ConfigError("a Ray child needs cpus_per_run > 0 or gpus_per_run > 0")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ConfigError(f"retries must be an int >= 0, got {self.retries!r}")
        if self.address is not None:
            _host_port(self.address)  # a malformed address fails here, in one line (Ray's own error is a traceback)

    def check_reachable(self, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
        """Ray with an ``address``: fail in about ``timeout`` seconds, in one line, when the cluster cannot be
        joined: Ray (or, for ``ray://``, Ray Client) not installed, or nothing at ``host:port`` that answers
        as a Ray server does (gRPC). Called before the ablation's parent run exists; ``ray.init`` itself
        waits about two minutes for a silent port, and forever for some."""
        if self.name != "ray" or self.address is None:
            return
        _import_ray()
        if self.address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
            raise ConfigError(
                f"address {self.address!r} is a Ray Client address, which needs Ray Client: pip install "
                "'ray[client]' (or give the cluster's GCS address host:6379 on a machine of the "
                "cluster, or auto)"
            )
        target = _host_port(self.address)
        if target is None:  # auto: Ray finds the cluster of this machine itself (and says so when there is none)
            return
        _check_grpc_server(self.address, *target, timeout=timeout)


def run_children(
    children: list,
    settings: ExecutorSettings,
    *,
    parent_id: Optional[str],
    quiet: bool,
    metric: str,
    say: Callable[..., None],
) -> tuple[dict, list]:
    """Train ``children`` (``(variant, seed, recipe_data, tags)``) with ``settings``.

    Returns ``({(variant, seed): child result}, [{"variant", "seed", "error"}, ...])``.
    """
    if settings.name == "ray":
        return _run_ray(children, settings, parent_id, metric, say)
    if settings.jobs == 1 or len(children) <= 1:
        return _run_here(children, parent_id, quiet, metric, say)
    return _run_processes(children, settings.jobs, parent_id, metric, say)


def _run_child(
    recipe_data: dict,
    *,
    parent_run_id: Optional[str],
    tags: dict[str, str],
    quiet: bool,
    metric: str,
    threads: Optional[int] = None,
) -> dict[str, Any]:
    """Train one child (also the entry point of worker processes and Ray tasks); returns plain data only."""
    if threads:
        torch.set_num_threads(threads)
    recipe = Recipe.model_validate(recipe_data)
    result = _run.run_recipe(recipe, resume="auto", parent_run_id=parent_run_id, extra_tags=tags, quiet=quiet)
    keys = metric_keys(metric)
    metrics = result.metrics if keys["split"] == "val" else result.test_metrics
    values = dict(getattr(metrics, "values", {}) or {})
    ci = dict(getattr(metrics, "ci", {}) or {})
    low, high = ci.get(keys["name"], (math.nan, math.nan))
    return {
        "run_id": result.run_id,
        "run_dir": str(result.run_dir),
        "value": float(values.get(keys["name"], math.nan)),
        "ci_low": float(low),
        "ci_high": float(high),
    }


def _failure(name, seed, err) -> dict[str, Any]:
    return {"variant": name, "seed": seed, "error": f"{type(err).__name__}: {err}"}


def _run_here(children, parent_id, quiet, metric, say):
    results, failed = {}, []
    for n, (name, seed, data, tags) in enumerate(children, 1):
        say(f"[{n}/{len(children)}] {name} | seed {seed}")
        try:
            results[(name, seed)] = _run_child(data, parent_run_id=parent_id, tags=tags, quiet=quiet, metric=metric)
        except Exception as err:  # noqa: BLE001 - one failed child must not lose the others
            failed.append(_failure(name, seed, err))
            say(f"  FAILED {name} | seed {seed}: {type(err).__name__}: {err}", file=sys.stderr)
    return results, failed


def _run_processes(children, jobs, parent_id, metric, say):
    """Children in worker processes (spawned: no CUDA/fork surprises); threads split between them."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    results, failed = {}, []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {
            pool.submit(
                _run_child, data, parent_run_id=parent_id, tags=tags, quiet=True, metric=metric, threads=threads
            ): (name, seed)
            for name, seed, data, tags in children
        }
        for n, future in enumerate(as_completed(futures), 1):
            name, seed = futures[future]
            try:
                results[(name, seed)] = future.result()
                say(f"[{n}/{len(futures)}] finished {name} | seed {seed}")
            except Exception as err:  # noqa: BLE001
                failed.append(_failure(name, seed, err))
                say(f"[{n}/{len(futures)}] FAILED {name} | seed {seed}: {type(err).__name__}: {err}", file=sys.stderr)
    return results, failed


# ------------------------------------------------------------------------------------------- Ray
def _host_port(address: str) -> Optional[tuple[str, int]]:
    """``(host, port)`` of a Ray address (``ray://host:port`` or ``host:port``); None for ``auto``."""
    if address == "auto":
        return None
    rest = address[len("ray://") :] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    bad = "/@ []" if host.startswith("[") and host.endswith("]") else "/:@ []"  # [IPv6]:port
    host = host[1:-1] if bad == "/@ []" else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in bad):
        raise ConfigError(f"address must be {_ADDRESS_FORMS}, got {address!r}")
    return host, int(port)


# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, a Ray Client server)
# answers with a SETTINGS frame of its own at once.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _check_grpc_server(address: str, host: str, port: int, *, timeout: float) -> None:
    fix = "start it with `ray start --head`, check the host and port, or leave --address out for a local Ray"
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.timeout:
        raise ConfigError(
            f"cannot reach the Ray cluster at address {address!r}: no answer within {timeout:g} s; {fix}"
        ) from None
    except OSError as err:
        raise ConfigError(
            f"cannot reach the Ray cluster at address {address!r}: {host}:{port}: {err.strerror or err}; {fix}"
        ) from None
    if len(head) < 9 or head[3] != 4:  # not an HTTP/2 SETTINGS frame: some other service, or it hung up
        raise ConfigError(f"address {address!r}: {host}:{port} answers, but not as a Ray server (gRPC); {fix}")


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise ConfigError(
            "executor 'ray' needs Ray, which is not installed: pip install 'medtricks[ray]' "
            "(or pip install ray; 'ray[client]' for a ray:// address)"
        ) from err
    return ray


def _ray_child(data: dict, parent_id: Optional[str], tags: dict, metric: str, threads: int, cwd: str) -> dict[str, Any]:
    """One child inside a Ray worker: the driver's working directory (relative data roots, a
    ``sqlite:///mlflow.db`` URI) where this node has it, then the same child function as locally."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    return _run_child(data, parent_run_id=parent_id, tags=tags, quiet=True, metric=metric, threads=threads)


def _run_ray(children, settings: ExecutorSettings, parent_id, metric, say):
    ray = _import_ray()
    started_here = False
    if not ray.is_initialized():
        options: dict[str, Any] = {}
        if settings.address is None:
            # A throw-away local cluster: no dashboard, quiet logs, every core of this machine.
            options.update(num_cpus=os.cpu_count() or 1, include_dashboard=False)
        else:
            settings.check_reachable()  # ray.init would wait minutes (or for ever) on an address that is not Ray
            options["address"] = settings.address
        try:
            ray.init(log_to_driver=False, configure_logging=False, **options)
        except ConnectionError as err:
            raise ConfigError(
                f"cannot reach the Ray cluster at address {settings.address!r}: {err}; start one "
                "with `ray start --head` or leave --address out for a local Ray"
            ) from err
        started_here = True
    try:
        resources = ray.cluster_resources()
        if settings.cpus_per_run > resources.get("CPU", 0) or settings.gpus_per_run > resources.get("GPU", 0):
            short = (
                f"each child asks for {settings.cpus_per_run:g} CPU and {settings.gpus_per_run:g} GPU but the "
                f"Ray cluster has {resources.get('CPU', 0):g} CPU and {resources.get('GPU', 0):g} GPU in all"
            )
            if started_here and settings.address is None:  # the local Ray of this call cannot grow
                raise ConfigError(f"{short}: no child could ever start")
            # A cluster of its own may autoscale: wait for it, but say why nothing starts yet.
            say(f"warning: {short} now; the children wait until the cluster scales up", file=sys.stderr)
        env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV_PREFIXES)}
        task = ray.remote(_ray_child).options(
            num_cpus=settings.cpus_per_run,
            num_gpus=settings.gpus_per_run,
            max_retries=settings.retries,
            retry_exceptions=False,
            runtime_env={"env_vars": env} if env else None,
        )
        threads = max(1, int(settings.cpus_per_run))
        cwd = os.getcwd()
        refs = {
            task.remote(data, parent_id, tags, metric, threads, cwd): (name, seed)
            for name, seed, data, tags in children
        }
        at_once = int(resources.get("CPU", 0) // settings.cpus_per_run) if settings.cpus_per_run else len(refs)
        say(
            f"Ray: {len(refs)} children on {resources.get('CPU', 0):g} CPU / {resources.get('GPU', 0):g} GPU "
            f"(up to {max(1, at_once)} at once; a child whose worker dies is retried {settings.retries} time(s))"
        )
        results, failed = {}, []
        pending = list(refs)
        n = 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            n += 1
            name, seed = refs[ready[0]]
            try:
                results[(name, seed)] = ray.get(ready[0])
                say(f"[{n}/{len(refs)}] finished {name} | seed {seed}")
            except Exception as err:  # noqa: BLE001 - a training error, or a worker that died every retry
                cause = getattr(err, "cause", None)
                failure = _failure(name, seed, cause if isinstance(cause, BaseException) else err)
                failed.append(failure)
                say(f"[{n}/{len(refs)}] FAILED {name} | seed {seed}: {failure['error']}", file=sys.stderr)
        return results, failed
    finally:
        if started_here:
            ray.shutdown()
