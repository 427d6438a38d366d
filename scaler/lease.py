"""One scaler run applies at a time: a lease row in the forecast store, with an owner and an expiry.

Why a lease row in the forecast store (and not a file lock, an advisory lock or DynamoDB):

* Every scaler run already reaches the store (PostgreSQL in production, shared by every Airflow
  worker on every machine; SQLite on one host for the embedded default), so the lock needs no
  new infrastructure and works across machines wherever the store does.
* It is *visible*: ``SELECT * FROM scaler_leases`` shows who holds it (``host:pid:random``),
  since when and until when. A session-scoped ``pg_advisory_lock`` shows only a number in
  ``pg_locks``, needs a different mechanism on SQLite, and stays held by a hung (not dead)
  process for as long as its connection lives.
* It *expires*: a run that crashes holds the lease for at most ``ttl_s``, then the next run
  takes it over. AWS has no compare-and-set primitive for Auto Scaling groups (tags are
  last-writer-wins), so an AWS-native lock would need DynamoDB, which the scaler does not use.

Acquiring is one atomic statement on both databases::

    INSERT INTO scaler_leases (name, owner, acquired_at, expires_at) VALUES (...)
    ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, ...
    WHERE scaler_leases.expires_at <= :now OR scaler_leases.owner = :owner

(PostgreSQL evaluates the ``WHERE`` under the row lock; SQLite runs one writer at a time), then
the row is read back in the same transaction: the caller holds the lease iff the row names it.
Times come from the database clock on PostgreSQL (``now()``), so machines with skewed clocks
agree; SQLite is one host, whose clock is used.

Fencing: AWS calls carry no fencing token, so :meth:`ScalerLease.ensure_held` (called after
planning, right before the first mutating call) renews the lease and raises if it was lost. A
cycle takes about a second against a ``ttl_s`` of 120 s; a holder stalled past its expiry finds
out before it applies.

Imports SQLAlchemy (through :mod:`pipeline.forecast_store`); :mod:`scaler.aws` never imports this
module, so a scaler without a store still runs with only boto3 and pyarrow.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from pipeline.forecast_store import ForecastStore, scaler_leases

log = logging.getLogger(__name__)

#: The lease every ``warmcast scale`` run and the DAG's scale task compete for.
SCALE_LEASE = "scale"


class LeaseHeldError(RuntimeError):
    """Another run holds the lease: nothing was applied. ``holder`` and ``expires_at`` say who and until when."""

    def __init__(self, name: str, holder: str, expires_at: datetime):
        self.name, self.holder, self.expires_at = name, holder, expires_at
        super().__init__(f"scaler lease {name!r} is held by {holder} until {expires_at.isoformat()}: "
                         "another scaler run is applying; this run applied nothing")


class LeaseLostError(RuntimeError):
    """The lease expired and was taken over (or released) before this run applied: nothing was applied."""


def default_owner() -> str:
    """``host:pid:random``: unique per run, and says to an operator where the holder runs."""
    return f"{socket.gethostname()[:180]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class ScalerLease:
    """The lease ``name`` in ``store`` for ``ttl_s`` seconds, held by ``owner``.

    Use :meth:`acquire` / :meth:`release`, or ``with lease:``. :func:`scaler.aws.scale_cycle`
    takes one through its ``lease=`` argument.
    """

    store: ForecastStore
    name: str = SCALE_LEASE
    ttl_s: float = 120.0
    owner: str = field(default_factory=default_owner)
    held_until: datetime | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.ttl_s > 0:
            raise ValueError(f"lease ttl_s={self.ttl_s} must be > 0")

    def _now(self, conn: sa.Connection) -> datetime:
        if conn.dialect.name == "postgresql":
            return conn.execute(sa.select(sa.func.now())).scalar_one().astimezone(timezone.utc)
        return datetime.now(timezone.utc)

    def acquire(self) -> datetime:
        """Take the lease (or extend it if this owner holds it); returns its expiry (UTC).

        Raises :class:`LeaseHeldError` when another owner holds an unexpired lease.
        """
        t = scaler_leases

        def take(conn: sa.Connection) -> tuple[str, datetime]:
            now = self._now(conn)
            ins = (postgresql.insert(t) if conn.dialect.name == "postgresql" else sqlite.insert(t)).values(
                name=self.name, owner=self.owner, acquired_at=now, expires_at=now + timedelta(seconds=self.ttl_s))
            stmt = ins.on_conflict_do_update(
                index_elements=[t.c.name],
                set_={"owner": ins.excluded.owner, "acquired_at": ins.excluded.acquired_at,
                      "expires_at": ins.excluded.expires_at},
                where=sa.or_(t.c.expires_at <= now, t.c.owner == self.owner))
            conn.execute(stmt)
            row = conn.execute(sa.select(t.c.owner, t.c.expires_at).where(t.c.name == self.name)).one()
            return row.owner, row.expires_at

        holder, expires = self.store._run(take)
        if holder != self.owner:
            log.warning("scaler lease %r held by %s until %s: not applying", self.name, holder, expires.isoformat())
            raise LeaseHeldError(self.name, holder, expires)
        self.held_until = expires
        log.info("scaler lease %r taken by %s until %s", self.name, self.owner, expires.isoformat())
        return expires

    def ensure_held(self) -> datetime:
        """Renew the lease this owner holds; raises :class:`LeaseLostError` if it expired or changed hands."""
        t = scaler_leases

        def renew(conn: sa.Connection) -> tuple[int, datetime]:
            now = self._now(conn)
            until = now + timedelta(seconds=self.ttl_s)
            stmt = (sa.update(t).where(t.c.name == self.name, t.c.owner == self.owner, t.c.expires_at > now)
                    .values(expires_at=until))
            return conn.execute(stmt).rowcount, until

        n, until = self.store._run(renew)
        if n != 1:
            self.held_until = None
            raise LeaseLostError(f"scaler lease {self.name!r} is no longer held by {self.owner} (expired after "
                                 f"{self.ttl_s:.0f} s or taken over): this run applied nothing")
        self.held_until = until
        return until

    def release(self) -> bool:
        """Give the lease up if this owner holds it; True when a row was released."""
        t = scaler_leases
        n = self.store._run(lambda conn: conn.execute(
            sa.delete(t).where(t.c.name == self.name, t.c.owner == self.owner)).rowcount)
        self.held_until = None
        return n == 1

    def holder(self) -> dict[str, Any] | None:
        """The lease row (owner, acquired_at, expires_at), or None when nobody ever took it or it was released."""
        t = scaler_leases
        rows = self.store._select(sa.select(t).where(t.c.name == self.name), None)
        return rows[0] if rows else None  # type: ignore[index]

    def __enter__(self) -> "ScalerLease":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
