"""Writes that can wait: the part of :class:`~medtricks.tracking.mlflow_store.MlflowStore` that keeps a
run's writes while its MLflow store is away.

Each write is retried with a short backoff; one that still fails with a "not now" error is kept, in
memory and appended to the run's spool file (``<run_dir>/store/unsent.jsonl``), and sent in order
before the next write once the cool-down after the failure has passed. A resumed run picks up what a
crashed process of it kept. The store's docstring tells the whole story.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from medtricks.tracking.base import TrackingWarning
from medtricks.tracking.mlflow_io import (
    _UNSENT_FILES_DIR,
    _absolute_uri,
    _forget_file,
    _read_spool,
    _retrying,
    _send,
    _transient,
    _write_spool,
    spool_path,
)

__all__ = ["WriteOutbox"]


class WriteOutbox:
    """Mixin: retry, keep and later send the writes of one run. The store class sets the tuning
    (``retry_delays``, ``retry_budget_s``, ``final_retry_delays``, ``final_budget_s``, ``cooldown_s``)
    and ``uri``, ``client`` and ``run_id``; it calls :meth:`_reset_outbox` when a run starts."""

    uri: str
    client: Any
    run_id: Optional[str]
    retry_delays: Sequence[float]
    retry_budget_s: float
    final_retry_delays: Sequence[float]
    final_budget_s: float
    cooldown_s: tuple[float, float]

    @property
    def unsent_path(self) -> Optional[Path]:
        """The spool file holding this run's unsent writes, while there are any (else None)."""
        return self._spool if self._pending else None

    @property
    def unsent(self) -> int:
        """How many writes of this run wait for the store."""
        return len(self._pending)

    # ----------------------------------------------------------------- writes that can wait
    def _reset_outbox(self, spool: Optional[Path]) -> None:
        self._record_uri = _absolute_uri(self.uri)
        self._pending: deque[dict[str, Any]] = deque()
        self._others: list[dict[str, Any]] = []  # spool records of other runs: left as they are
        self._spool = spool
        self._spool_ok = True
        self._retry_at = 0.0
        self._cooldown = 0.0
        self._outage: Optional[str] = None

    @property
    def _spool_files(self) -> Path:
        return (self._spool or spool_path(None, str(self.run_id))).parent / _UNSENT_FILES_DIR

    def _pick_up_spool(self) -> None:
        """A resumed run sends what a crashed process of it had kept."""
        if self._spool is None or not self._spool.is_file():
            return
        records = _read_spool(self._spool)
        self._others = [r for r in records if r["run_id"] != self.run_id]
        mine = [r for r in records if r["run_id"] == self.run_id and r["op"] != "end"]  # this process ends it
        self._pending.extend(mine)
        if len(mine) + len(self._others) < len(records):  # an earlier end of this run (or a cut line) goes
            try:
                _write_spool(self._spool, [*self._others, *self._pending])
            except OSError:
                self._spool_ok = False
        if mine:
            warnings.warn(
                f"{self._spool}: sending {len(mine)} writes an earlier process of run {self.run_id} could not send",
                TrackingWarning,
                stacklevel=3,
            )
            self._flush(final=False)

    def _write(
        self,
        record: dict[str, Any],
        *,
        send: Optional[Callable[[], None]] = None,
        keep: Optional[Callable[[], dict[str, Any]]] = None,
        final: bool = False,
    ) -> None:
        """Send one write after everything kept before it; keep it when the store is away."""
        record = {"run_id": self.run_id, "uri": self._record_uri, **record}
        budget = self.final_budget_s if final else self.retry_budget_s
        deadline = time.monotonic() + budget
        if self._pending and not self._flush(final=final, deadline=deadline):
            self._keep(record, keep)
            return
        try:
            _retrying(
                send or (lambda: _send(self.client, record)),
                self.final_retry_delays if final else self.retry_delays,
                deadline,
            )
        except Exception as err:  # noqa: BLE001 - a write that is wrong is raised as before
            if not _transient(err):
                raise
            self._keep(record, keep)
            self._failed(err)

    def _keep(self, record: dict[str, Any], keep: Optional[Callable[[], dict[str, Any]]] = None) -> None:
        if keep is not None:
            try:
                record = {"run_id": self.run_id, "uri": self._record_uri, **keep()}
            except Exception as err:  # noqa: BLE001 - a figure that cannot be saved is lost, not training
                warnings.warn(
                    f"could not keep a {record.get('op')} write for later ({type(err).__name__}: {err}); "
                    "it is not logged",
                    TrackingWarning,
                    stacklevel=3,
                )
                return
        self._pending.append(record)
        if self._spool is None:
            return
        try:
            if self._spool_ok:
                self._spool.parent.mkdir(parents=True, exist_ok=True)
                with open(self._spool, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
            else:  # the spool missed records (disk full): write it whole again
                _write_spool(self._spool, [*self._others, *self._pending])
                self._spool_ok = True
        except OSError as err:
            if self._spool_ok:
                warnings.warn(
                    f"cannot write {self._spool} ({type(err).__name__}: {err}): writes MLflow did not "
                    "take are kept in memory only until it can",
                    TrackingWarning,
                    stacklevel=3,
                )
            self._spool_ok = False

    def _flush(self, *, final: bool = False, deadline: Optional[float] = None) -> bool:
        """Send kept writes in order; True when none is left. Within the cool-down after a failure the
        store is not tried (except by ``end()``)."""
        if not final and time.monotonic() < self._retry_at:
            return False
        delays = self.final_retry_delays if final else self.retry_delays
        deadline = (
            deadline
            if deadline is not None
            else time.monotonic() + (self.final_budget_s if final else self.retry_budget_s)
        )
        sent = 0
        try:
            while self._pending:
                record = self._pending[0]
                try:
                    _retrying(lambda: _send(self.client, record), delays, deadline)
                except Exception as err:  # noqa: BLE001 - classified here
                    if _transient(err):
                        self._failed(err)
                        return False
                    warnings.warn(
                        f"dropping a kept {record.get('op')} write that MLflow refuses ({type(err).__name__}: {err})",
                        TrackingWarning,
                        stacklevel=3,
                    )
                self._pending.popleft()
                sent += 1
                _forget_file(record, self._spool)
        finally:
            if sent and self._spool is not None:
                try:
                    _write_spool(self._spool, [*self._others, *self._pending])
                    self._spool_ok = True
                except OSError:
                    self._spool_ok = False
        if self._outage is not None:
            warnings.warn(
                f"MLflow at {self.uri} answers again: sent {sent} kept writes of run {self.run_id}",
                TrackingWarning,
                stacklevel=3,
            )
        self._outage, self._cooldown, self._retry_at = None, 0.0, 0.0
        return True

    def _failed(self, err: BaseException) -> None:
        """The store is away: leave it alone for a while (doubling up to ``cooldown_s[1]``); say so once."""
        first, longest = self.cooldown_s
        self._cooldown = min(longest, max(first, 2 * self._cooldown))
        self._retry_at = time.monotonic() + self._cooldown
        if self._outage is None:
            self._outage = f"{type(err).__name__}: {str(err)[:300]}"
            where = self._spool if self._spool is not None else "memory"
            warnings.warn(
                f"MLflow at {self.uri} did not take a write ({self._outage}); training goes on, and "
                f"writes are kept in {where} and sent in order when it answers again",
                TrackingWarning,
                stacklevel=4,
            )
