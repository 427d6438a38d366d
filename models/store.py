"""Versioned model store in the lake: stacked per-user weights, sharded, published atomically.

Layout (``<lake>`` a local folder or ``s3://bucket/prefix``, all I/O through
:mod:`pipeline.storage`)::

    <lake>/models/<name>/latest                                  {"version": ...}, written last
    <lake>/models/<name>/versions/<version>/shard-00000.pt       torch.save({tensor name: [n, ...]})
    <lake>/models/<name>/versions/<version>/shard-00000.users.parquet   user_id per row of the shard
    <lake>/models/<name>/versions/<version>/index.parquet        user_id -> (shard, row)
    <lake>/models/<name>/versions/<version>/metadata.json        training window, metrics, code version
    <lake>/models/<name>/versions/<version>/MANIFEST.json        files + sha256, written after the rest

Shards are ``torch.save`` files of a flat ``dict[str, Tensor]`` whose tensors are stacked over the
shard's users (``[n_users_in_shard, ...]``), read back with ``torch.load(weights_only=True)`` so
loading never runs pickled code. A shard is written by one training task
(:meth:`ModelStore.write_shard`; :meth:`ModelStore.read_shard` reads it back, checked, before
publish); :meth:`ModelStore.publish` then writes the index, the metadata and the manifest, and
moves ``latest``.

The manifest also records the training window, so :meth:`ModelStore.version_trained_before`
can pick, for a forecast issued (or a training run) at time *t*, the newest version trained only
on data before *t*: a back-fill never uses a model that saw its future.

Atomic publish: each object is written atomically (:meth:`Location.write_atomic`), and a version
exists only once its ``MANIFEST.json`` does. A crash before that leaves files that no reader
lists or loads (the version folder is its own staging area); ``latest`` still names the previous
version. Every file's sha256 is in the manifest and is checked on load, so a corrupt or truncated
shard raises :class:`CorruptModelError` naming the file, and older versions stay loadable
(:meth:`ModelStore.load_latest` with ``fallback=True`` serves the newest intact one).

User ids are data, never paths: they live only inside the Parquet index, so any string
(``'../../x'`` included) is safe. Model names and versions are checked with
:func:`pipeline.schemas.check_id`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import subprocess
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.schemas import check_id
from pipeline.storage import Location, open_location, parquet_bytes

log = logging.getLogger(__name__)

FORMAT = "warmcast-stacked-torch/1"
USER_FORMAT = "warmcast-user-params/1"
MANIFEST, INDEX, METADATA, LATEST = "MANIFEST.json", "index.parquet", "metadata.json", "latest"
DEFAULT_SHARD_SIZE = 1024  #: users per shard file
_AUTO_METADATA = ("name", "version", "created_at", "training_window", "metrics", "code_version", "n_users", "n_shards",
                  "imported_user", "base_version")
Weights = Mapping[str, torch.Tensor]


class ModelStoreError(RuntimeError):
    """A model version is missing, malformed, or cannot be written."""


class CorruptModelError(ModelStoreError):
    """A stored file does not match the checksum its manifest recorded (corrupt or truncated)."""


@dataclass(frozen=True)
class ShardInfo:
    """What :meth:`ModelStore.write_shard` wrote; JSON-able (``asdict``) to pass between tasks."""

    shard: int
    file: str
    sha256: str
    bytes: int
    n_users: int
    users_file: str
    users_sha256: str
    tensors: dict  #: tensor name -> {"shape": per-user shape, "dtype": "float32"}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ShardInfo":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass
class StoredModel:
    """One loaded version: ``weights[name]`` is ``[len(user_ids), ...]``, row ``i`` is ``user_ids[i]``."""

    name: str
    version: str
    user_ids: list[str]
    weights: dict[str, torch.Tensor]
    metadata: dict
    manifest: dict
    missing: list[str] = field(default_factory=list)  #: requested users the version has no row for
    fell_back_from: str | None = None  #: set when ``load_latest(fallback=True)`` skipped a broken version

    def row(self, user_id: str) -> int:
        try:
            return self.user_ids.index(user_id)
        except ValueError:
            raise KeyError(f"model {self.name!r} version {self.version!r} has no user {user_id!r}") from None

    def user_params(self, user_id: str) -> dict[str, torch.Tensor]:
        """One user's parameters: the row of every tensor (shapes without the user axis)."""
        i = self.row(user_id)
        return {k: v[i].clone() for k, v in self.weights.items()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _code_version() -> str:
    """``$WARMCAST_CODE_VERSION``, else ``git:<sha>`` of this checkout, else ``unknown``."""
    if os.environ.get("WARMCAST_CODE_VERSION"):
        return os.environ["WARMCAST_CODE_VERSION"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True, timeout=5)
        return "git:" + out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _tensor_bytes(tensors: Weights) -> bytes:
    buf = io.BytesIO()
    # clone(): a row slice would otherwise drag its whole storage into the file.
    torch.save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, buf)
    return buf.getvalue()


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def _describe(weights: Weights) -> dict[str, dict]:
    return {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in sorted(weights.items())}


class ModelStore:
    """The versions of model ``name`` under ``<lake>/models/<name>/``."""

    def __init__(self, lake: Location | str, name: str, s3_endpoint_url: str | None = None):
        self.name = check_id(name, "model name")
        loc = lake if isinstance(lake, Location) else open_location(lake, s3_endpoint_url)
        self.loc = loc.child("models", self.name)

    # ---- paths -------------------------------------------------------------------------------
    def _vpath(self, version: str, *parts: str) -> str:
        return self.loc.path("versions", check_id(version, "model version"), *parts)

    def _read_checked(self, version: str, file: str, sha256: str) -> bytes:
        path = self._vpath(version, file)
        where = f"model {self.name!r} version {version!r}: {self.loc.display(path)}"
        try:
            data = self.loc.read_bytes(path)
        except (FileNotFoundError, OSError) as exc:
            raise CorruptModelError(f"{where} cannot be read ({exc})") from exc
        got = _sha256(data)
        if got != sha256:
            raise CorruptModelError(f"{where} is corrupt or truncated: sha256 {got[:12]}… != manifest {sha256[:12]}… ({len(data)} bytes)")
        return data

    def _shard_users(self, version: str, info: ShardInfo) -> list[str]:
        return pq.read_table(io.BytesIO(self._read_checked(version, info.users_file, info.users_sha256)))["user_id"].to_pylist()

    # ---- writing -----------------------------------------------------------------------------
    @staticmethod
    def new_version() -> str:
        """A fresh, time-sortable version id, e.g. ``20260302T100000123456Z-1a2b3c``."""
        return _now().strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]

    def _check_unpublished(self, version: str) -> None:
        if self.loc.exists(self._vpath(version, MANIFEST)):
            raise ModelStoreError(f"model {self.name!r} version {version!r} is already published; versions are immutable")

    def write_shard(self, version: str, shard: int, user_ids: Sequence[str], weights: Weights) -> ShardInfo:
        """Write shard ``shard`` of an unpublished ``version``: ``weights[k]`` is ``[len(user_ids), ...]``.

        Not visible to readers until :meth:`publish`. Returns what ``publish`` needs.
        """
        self._check_unpublished(version)
        users = [str(u) for u in user_ids]
        if not users or len(set(users)) != len(users):
            raise ValueError("a shard needs at least one user and no duplicate user ids")
        if not weights:
            raise ValueError("a shard needs at least one tensor")
        for k, v in weights.items():
            if not isinstance(v, torch.Tensor) or v.ndim < 1 or v.shape[0] != len(users):
                raise ValueError(f"tensor {k!r}: expected a tensor with leading dimension {len(users)} (one row per user)")
        data = _tensor_bytes(weights)
        users_bytes = parquet_bytes(pa.table({"user_id": pa.array(users, pa.string())}), "snappy")
        file, users_file = f"shard-{int(shard):05d}.pt", f"shard-{int(shard):05d}.users.parquet"
        self.loc.write_bytes(self._vpath(version, users_file), users_bytes)
        self.loc.write_bytes(self._vpath(version, file), data)
        return ShardInfo(int(shard), file, _sha256(data), len(data), len(users), users_file, _sha256(users_bytes), _describe(weights))

    def publish(self, version: str, shards: Sequence[ShardInfo | Mapping], *, training_window: tuple[datetime, datetime] | None = None,
                metrics: Mapping | None = None, extra: Mapping | None = None, set_latest: bool = True) -> str:
        """Make ``version`` visible: write its index and metadata, then its manifest, then ``latest``.

        ``shards``: the :class:`ShardInfo` of every :meth:`write_shard` call (dicts accepted);
        ``training_window``: ``(start, end)`` of the training data; ``metrics``: e.g. held-out pinball
        loss; ``extra``: anything else worth recording (hyper-parameters).
        """
        self._check_unpublished(version)
        infos = sorted((s if isinstance(s, ShardInfo) else ShardInfo.from_dict(s) for s in shards), key=lambda s: s.shard)
        if not infos or len({s.shard for s in infos}) != len(infos):
            raise ValueError("publish needs at least one shard and distinct shard numbers")
        users, shard_no, rows = [], [], []
        for s in infos:
            part = self._shard_users(version, s)
            users += part
            shard_no += [s.shard] * len(part)
            rows += range(len(part))
        if len(set(users)) != len(users):
            raise ValueError("a user appears in more than one shard")
        if any(s.tensors != infos[0].tensors for s in infos):
            raise ValueError("shards disagree on tensor names, per-user shapes or dtypes")
        index = {"user_id": pa.array(users, pa.string()), "shard": pa.array(shard_no, pa.int32()), "row": pa.array(rows, pa.int32())}
        index_bytes = parquet_bytes(pa.table(index), "snappy")
        created = _now().isoformat()
        window = None if training_window is None else {"start": training_window[0].isoformat(), "end": training_window[1].isoformat()}
        meta = {"name": self.name, "version": version, "created_at": created, "training_window": window, "metrics": dict(metrics or {}),
                "code_version": _code_version(), "n_users": len(users), "n_shards": len(infos), **dict(extra or {})}
        meta_bytes = _json_bytes(meta)
        self.loc.write_bytes(self._vpath(version, INDEX), index_bytes)
        self.loc.write_bytes(self._vpath(version, METADATA), meta_bytes)
        manifest = {"format": FORMAT, "name": self.name, "version": version, "created_at": created, "parent": self.latest_version(),
                    "training_window": window, "n_users": len(users), "tensors": infos[0].tensors, "shards": [asdict(s) for s in infos],
                    "index": {"file": INDEX, "sha256": _sha256(index_bytes)}, "metadata": {"file": METADATA, "sha256": _sha256(meta_bytes)}}
        self.loc.write_bytes(self._vpath(version, MANIFEST), _json_bytes(manifest))  # the commit point
        if set_latest:
            self.set_latest(version)
        return version

    def read_shard(self, version: str, info: ShardInfo | Mapping) -> tuple[list[str], dict[str, torch.Tensor]]:
        """One shard's users and weights, checked against the :class:`ShardInfo` that :meth:`write_shard`
        returned; works before :meth:`publish` (a training task reads the global model its run wrote)."""
        info = info if isinstance(info, ShardInfo) else ShardInfo.from_dict(info)
        return self._shard_users(version, info), self._load_shard(version, info, info.tensors)

    def set_latest(self, version: str) -> None:
        """Point ``latest`` at a published ``version`` (also how to roll back)."""
        if not self.loc.exists(self._vpath(version, MANIFEST)):
            raise ModelStoreError(f"model {self.name!r} has no published version {version!r}")
        self.loc.write_bytes(self.loc.path(LATEST), _json_bytes({"version": version, "updated_at": _now().isoformat()}))

    def save(self, user_ids: Sequence[str], weights: Weights, *, version: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
             training_window: tuple[datetime, datetime] | None = None, metrics: Mapping | None = None, extra: Mapping | None = None,
             set_latest: bool = True) -> str:
        """Write and publish a version in one call: ``weights[k]`` is ``[len(user_ids), ...]``. Returns the version."""
        version = version or self.new_version()
        n = len(user_ids)
        shards = [
            self.write_shard(version, i, user_ids[lo : lo + shard_size], {k: v[lo : lo + shard_size] for k, v in weights.items()})
            for i, lo in enumerate(range(0, n, shard_size))
        ]
        return self.publish(version, shards, training_window=training_window, metrics=metrics, extra=extra, set_latest=set_latest)

    # ---- reading -----------------------------------------------------------------------------
    def manifest(self, version: str) -> dict:
        path = self._vpath(version, MANIFEST)
        if not self.loc.exists(path):
            raise ModelStoreError(f"model {self.name!r} has no published version {version!r}")
        try:
            manifest = json.loads(self.loc.read_bytes(path))
        except ValueError:
            manifest = {}
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != version:
            raise CorruptModelError(f"model {self.name!r}: {self.loc.display(path)} is not a {FORMAT} manifest of version {version!r}")
        return manifest

    def versions(self) -> list[str]:
        """Published versions, oldest first (by publish time); unpublished leftovers are ignored."""
        found = []
        for d in self.loc.list_dirs(self.loc.path("versions")):
            v = posixpath.basename(d)
            if self.loc.exists(posixpath.join(d, MANIFEST)):
                try:
                    found.append((self.manifest(v)["created_at"], v))
                except ModelStoreError:
                    found.append(("", v))  # unreadable manifest: listed oldest, fails on load
        return [v for _, v in sorted(found)]

    def training_window(self, version: str) -> tuple[datetime, datetime] | None:
        """``(start, end)`` of the data ``version`` was trained on; None when it was not recorded."""
        manifest = self.manifest(version)
        window = manifest["training_window"] if "training_window" in manifest else (  # older manifests: metadata
            json.loads(self._read_checked(version, METADATA, manifest["metadata"]["sha256"])).get("training_window"))
        if not window:
            return None
        return datetime.fromisoformat(window["start"]), datetime.fromisoformat(window["end"])

    def version_trained_before(self, at: datetime, *, strict: bool = False) -> str | None:
        """The version to use at time ``at`` without reading data from after it: ``latest`` when its
        training window ends at or before ``at`` (before it with ``strict``), else the published
        version with the newest such window end (ties: the newest publish). None when no version
        qualifies (versions without a recorded window never do).

        Forecasts issued at ``at`` (live or back-filled) and training runs for ``at`` (``strict``:
        a re-run for the same date must not fine-tune from its own earlier output) use this.
        """
        def fits(end: datetime) -> bool:
            return end < at if strict else end <= at

        latest = self.latest_version()
        if latest is not None:
            window = self.training_window(latest)
            if window is not None and fits(window[1]):
                return latest
        found = self.versions_trained_before(at, strict=strict)
        return found[0] if found else None

    def versions_trained_before(self, at: datetime, *, strict: bool = False) -> list[str]:
        """Every published version whose training window ends at or before ``at`` (before it with
        ``strict``), newest window end first (ties: the newest publish); versions whose manifest or
        window cannot be read are left out (logged)."""
        found: list[tuple[datetime, str, str]] = []
        for version in self.versions():
            try:
                window, created = self.training_window(version), self.manifest(version)["created_at"]
            except ModelStoreError as exc:  # a broken version is never chosen
                log.warning("%s; not a candidate for %s", exc, at.isoformat())
                continue
            if window is not None and (window[1] < at if strict else window[1] <= at):
                found.append((window[1], created, version))
        return [v for *_, v in sorted(found, reverse=True)]

    def latest_version(self) -> str | None:
        path = self.loc.path(LATEST)
        if not self.loc.exists(path):
            return None
        try:
            return check_id(json.loads(self.loc.read_bytes(path))["version"], "model version")
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelStoreError(f"model {self.name!r}: unreadable pointer {self.loc.display(path)} ({exc})") from exc

    def metadata(self, version: str, manifest: dict | None = None) -> dict:
        """The checked metadata of ``version`` (training window, metrics, code version, extras)."""
        manifest = manifest or self.manifest(version)
        return json.loads(self._read_checked(version, METADATA, manifest["metadata"]["sha256"]))

    def read_index(self, version: str, manifest: dict | None = None) -> pa.Table:
        """The checked ``user_id, shard, row`` index of ``version``."""
        manifest = manifest or self.manifest(version)
        return pq.read_table(io.BytesIO(self._read_checked(version, INDEX, manifest["index"]["sha256"])))

    def _load_shard(self, version: str, info: ShardInfo, tensors: dict) -> dict[str, torch.Tensor]:
        data = self._read_checked(version, info.file, info.sha256)
        where = f"model {self.name!r} version {version!r}: {self.loc.display(self._vpath(version, info.file))}"
        try:
            weights = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise CorruptModelError(f"{where} cannot be loaded ({exc})") from exc
        if _describe(weights) != tensors or any(v.shape[0] != info.n_users for v in weights.values()):
            raise CorruptModelError(f"{where} does not hold the tensors its manifest lists")
        return weights

    def load_version(self, version: str, user_ids: Sequence[str] | None = None) -> StoredModel:
        """Load ``version``: every user, or only ``user_ids`` (reading only their shards), in that order.

        Raises :class:`CorruptModelError` naming the file when a checksum does not match.
        """
        manifest = self.manifest(version)
        meta = json.loads(self._read_checked(version, METADATA, manifest["metadata"]["sha256"]))
        index = self.read_index(version, manifest)
        shards = {s["shard"]: ShardInfo.from_dict(s) for s in manifest["shards"]}
        all_users = index["user_id"].to_pylist()
        where = dict(zip(all_users, zip(index["shard"].to_pylist(), index["row"].to_pylist())))
        wanted = all_users if user_ids is None else [u for u in user_ids if u in where]
        missing = [] if user_ids is None else [u for u in user_ids if u not in where]
        needed = sorted({where[u][0] for u in wanted})
        loaded = {s: self._load_shard(version, shards[s], manifest["tensors"]) for s in needed}
        if user_ids is None:
            weights = {k: torch.cat([loaded[s][k] for s in needed]) for k in manifest["tensors"]} if needed else {}
        else:
            weights = {k: torch.stack([loaded[where[u][0]][k][where[u][1]] for u in wanted]) if wanted
                       else torch.empty((0, *d["shape"]), dtype=getattr(torch, d["dtype"])) for k, d in manifest["tensors"].items()}
        return StoredModel(self.name, version, list(wanted), weights, meta, manifest, missing)

    def load_latest(self, user_ids: Sequence[str] | None = None, fallback: bool = False) -> StoredModel:
        """Load the version ``latest`` names. With ``fallback``, a broken one is skipped (logged) for the
        newest older version that loads; the result's ``fell_back_from`` names the skipped one."""
        latest = self.latest_version()
        if latest is None:
            raise ModelStoreError(f"model {self.name!r} has no published version under {self.loc.uri}")
        try:
            return self.load_version(latest, user_ids)
        except ModelStoreError as exc:
            if not fallback:
                raise
            log.warning("%s; falling back to an older version", exc)
            for older in reversed([v for v in self.versions() if v != latest]):
                try:
                    model = self.load_version(older, user_ids)
                except ModelStoreError as exc2:
                    log.warning("%s", exc2)
                    continue
                model.fell_back_from = latest
                return model
            raise

    def verify(self, version: str) -> dict:
        """Read every file of ``version`` and check it against its manifest (sha256, tensors, the
        users of each shard against the index). Returns ``{"users", "shards", "bytes"}``; raises
        :class:`CorruptModelError` naming the first bad file, :class:`ModelStoreError` when the
        version is not published."""
        manifest = self.manifest(version)
        self.metadata(version, manifest)
        index = self.read_index(version, manifest)
        users, size = [], 0
        for s in sorted((ShardInfo.from_dict(s) for s in manifest["shards"]), key=lambda s: s.shard):
            part = self._shard_users(version, s)
            if len(part) != s.n_users:
                raise CorruptModelError(f"model {self.name!r} version {version!r}: {s.users_file} lists {len(part)} users, "
                                        f"the manifest {s.n_users}")
            self._load_shard(version, s, manifest["tensors"])
            users += part
            size += s.bytes
        if users != index["user_id"].to_pylist():
            raise CorruptModelError(f"model {self.name!r} version {version!r}: the index does not list the shards' users in order")
        return {"users": len(users), "shards": len(manifest["shards"]), "bytes": size}

    def delete_version(self, version: str) -> int:
        """Delete a published or leftover ``version`` (never the one ``latest`` names): its manifest
        first, so readers stop seeing it before any other file goes. Returns the files deleted."""
        if version == self.latest_version():
            raise ModelStoreError(f"model {self.name!r} version {version!r} is latest; promote another version first")
        folder = self._vpath(version)
        files = [f for f in self.loc.list_files(folder) if posixpath.basename(f) != MANIFEST]
        self.loc.delete(self._vpath(version, MANIFEST))
        for f in files:
            self.loc.delete(f)
        if self.loc.is_dir(folder):
            self.loc.fs.delete_dir(folder)
        return len(files) + 1

    # ---- one user's parameters ---------------------------------------------------------------
    def export_user(self, user_id: str, version: str | None = None) -> bytes:
        """One user's parameters (the row of every tensor) as a self-describing ``torch.save`` blob."""
        version = version or self.latest_version()
        if version is None:
            raise ModelStoreError(f"model {self.name!r} has no published version")
        model = self.load_version(version, [user_id])
        if model.missing:
            raise KeyError(f"model {self.name!r} version {version!r} has no user {user_id!r}")
        blob = {"format": USER_FORMAT, "model": self.name, "version": version, "user_id": user_id, "tensors": model.user_params(user_id)}
        buf = io.BytesIO()
        torch.save(blob, buf)
        return buf.getvalue()

    def read_user_export(self, blob: bytes, version: str) -> dict:
        """An :meth:`export_user` blob, checked: its format, and its tensors' names, shapes and dtypes
        against ``version``'s. Raises :class:`ModelStoreError` saying which does not fit."""
        try:
            data = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ModelStoreError(f"not a user-parameter export ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != USER_FORMAT or not isinstance(data.get("tensors"), dict):
            raise ModelStoreError(f"not a {USER_FORMAT} export")
        got, want = _describe({k: v.unsqueeze(0) for k, v in data["tensors"].items()}), self.manifest(version)["tensors"]
        if got != want:
            raise ModelStoreError(f"user parameters do not match model {self.name!r} version {version!r}: {got} vs {want}")
        return data

    def import_user(self, blob: bytes, *, user_id: str | None = None, base_version: str | None = None, set_latest: bool = True,
                    version: str | None = None, update: Callable[[dict, str], Mapping] | None = None) -> str:
        """Publish a new version: ``base_version`` (default latest) with one user's row replaced or added.

        ``blob`` comes from :meth:`export_user` (of this or another store with the same tensor
        shapes); ``user_id`` renames the user on the way in. Shards without the user are copied
        byte for byte. ``version``: the new version's id (default a fresh one); ``update``: called
        with the base version's metadata and the user id, returns metadata keys to set on the new
        version (the rest is copied). Returns the new version.
        """
        base = base_version or self.latest_version()
        if base is None:
            raise ModelStoreError(f"model {self.name!r} has no version to import into")
        data = self.read_user_export(blob, base)
        uid = str(user_id if user_id is not None else data["user_id"])
        params: dict[str, torch.Tensor] = data["tensors"]
        manifest = self.manifest(base)
        index = self.read_index(base, manifest)
        users = index["user_id"].to_pylist()
        shards = [ShardInfo.from_dict(s) for s in manifest["shards"]]
        target = int(index["shard"][users.index(uid)].as_py()) if uid in users else shards[-1].shard
        version = check_id(version, "model version") if version else self.new_version()
        self._check_unpublished(version)
        self.loc.makedirs(self._vpath(version))
        out = []
        for s in shards:
            if s.shard != target:  # unchanged: server-side copy; its checksum is verified on load
                for f in (s.file, s.users_file):
                    self.loc.fs.copy_file(self._vpath(base, f), self._vpath(version, f))
                out.append(s)
                continue
            weights = self._load_shard(base, s, manifest["tensors"])
            part = self._shard_users(base, s)
            if uid in part:
                for k in weights:
                    weights[k][part.index(uid)] = params[k]
            else:
                part.append(uid)
                weights = {k: torch.cat([v, params[k].unsqueeze(0)]) for k, v in weights.items()}
            out.append(self.write_shard(version, s.shard, part, weights))
        meta = json.loads(self._read_checked(base, METADATA, manifest["metadata"]["sha256"]))
        window = meta.get("training_window")
        extra = {k: v for k, v in meta.items() if k not in _AUTO_METADATA}  # e.g. hyper-parameters
        extra |= {"imported_user": {"user_id": uid, "from_model": data.get("model"), "from_version": data.get("version")}, "base_version": base}
        if update is not None:
            extra |= dict(update(meta, uid))
        tw = None if not window else (datetime.fromisoformat(window["start"]), datetime.fromisoformat(window["end"]))
        return self.publish(version, out, training_window=tw, metrics=meta.get("metrics"), extra=extra, set_latest=set_latest)
