"""Model store: versions, atomic publish, checksums, one user's parameters, local and S3."""

from __future__ import annotations

import io
import json
import os
from datetime import datetime, timezone

import boto3
import pytest
import torch

from models.store import CorruptModelError, ModelStore, ModelStoreError
from pipeline.storage import Location, open_location

UTC = timezone.utc
WINDOW = (datetime(2026, 2, 16, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC))


def _weights(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w_ih": torch.randn(n, 4, 12, generator=g),
        "bias": torch.randn(n, 12, generator=g).to(torch.bfloat16),
        "best_epoch": torch.arange(n, dtype=torch.int64),
    }


def _users(n: int) -> list[str]:
    return [f"user-{i:03d}" for i in range(n)]


def _shard_files(store: ModelStore, version: str) -> list[str]:
    return [p for p in store.loc.list_files(store.loc.path("versions", version)) if p.endswith(".pt")]


def test_save_and_load_round_trip(tmp_path):
    store = ModelStore(str(tmp_path), "lstm")
    users, w = _users(7), _weights(7)
    v = store.save(users, w, shard_size=3, training_window=WINDOW, metrics={"pinball_30min": 0.12}, extra={"hidden": 32})
    assert store.versions() == [v] and store.latest_version() == v
    assert len(_shard_files(store, v)) == 3
    model = store.load_latest()
    assert model.version == v and model.user_ids == users
    for k in w:
        assert torch.equal(model.weights[k], w[k]) and model.weights[k].dtype == w[k].dtype
    meta = model.metadata
    assert meta["training_window"] == {"start": WINDOW[0].isoformat(), "end": WINDOW[1].isoformat()}
    assert meta["metrics"] == {"pinball_30min": 0.12} and meta["hidden"] == 32 and meta["n_users"] == 7
    assert meta["code_version"] and datetime.fromisoformat(meta["created_at"]).tzinfo is not None
    some = store.load_version(v, ["user-005", "nobody", "user-001"])
    assert some.user_ids == ["user-005", "user-001"] and some.missing == ["nobody"]
    assert torch.equal(some.weights["w_ih"], w["w_ih"][[5, 1]])
    v2 = store.save(users[:2], _weights(2, seed=1))
    assert store.versions() == [v, v2] and store.manifest(v2)["parent"] == v


def test_crash_mid_publish_leaves_previous_version_latest(tmp_path, monkeypatch):
    store = ModelStore(str(tmp_path), "lstm")
    v1 = store.save(_users(5), _weights(5), shard_size=2)
    real = Location.write_bytes

    def crash_at_manifest(self, path, data):
        if path.endswith("MANIFEST.json"):
            raise OSError("disk full (simulated)")
        return real(self, path, data)

    monkeypatch.setattr(Location, "write_bytes", crash_at_manifest)
    with pytest.raises(OSError, match="simulated"):
        store.save(_users(5), _weights(5, seed=2), shard_size=2, version="half-written")
    monkeypatch.undo()
    assert len(_shard_files(store, "half-written")) == 3  # the files are there ...
    assert store.versions() == [v1] and store.latest_version() == v1  # ... but not the version
    with pytest.raises(ModelStoreError, match="no published version 'half-written'"):
        store.load_version("half-written")
    assert torch.equal(store.load_latest().weights["w_ih"], _weights(5)["w_ih"])

    # A crash while a shard streams out leaves no partial object, not even a temporary one.
    def crash_mid_stream(self, path, data):
        with self.write_atomic(path) as out:
            out.write(data[: len(data) // 2])
            raise OSError("killed (simulated)")

    monkeypatch.setattr(Location, "write_bytes", crash_mid_stream)
    with pytest.raises(OSError, match="killed"):
        store.save(_users(5), _weights(5), version="killed")
    monkeypatch.undo()
    assert store.loc.list_files(store.loc.path("versions", "killed")) == []
    assert store.load_latest().version == v1


def test_corrupt_or_truncated_shard_names_the_file_and_the_previous_version_still_loads(tmp_path):
    store = ModelStore(str(tmp_path), "lstm")
    v1 = store.save(_users(6), _weights(6), shard_size=4)
    v2 = store.save(_users(6), _weights(6, seed=3), shard_size=4)
    shard = _shard_files(store, v2)[1]
    with open(shard, "r+b") as f:  # truncate
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(CorruptModelError, match=r"shard-00001\.pt is corrupt or truncated"):
        store.load_version(v2)
    with pytest.raises(CorruptModelError, match=v2):
        store.load_latest()
    assert store.load_version(v2, ["user-000"]).user_ids == ["user-000"]  # shard 0 is intact
    assert store.load_version(v1).user_ids == _users(6)
    served = store.load_latest(fallback=True)
    assert served.version == v1 and served.fell_back_from == v2
    # Same length, one flipped byte: still caught.
    first = _shard_files(store, v1)[0]
    data = bytearray(open(first, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(first, "wb").write(bytes(data))
    with pytest.raises(CorruptModelError, match=r"shard-00000\.pt"):
        store.load_version(v1)
    with pytest.raises(CorruptModelError):
        store.load_latest(fallback=True)  # nothing intact left: the error says so


def test_export_and_import_one_user(tmp_path):
    store = ModelStore(str(tmp_path), "lstm")
    w = _weights(5)
    v1 = store.save(_users(5), w, shard_size=2, extra={"hidden": 12})
    blob = store.export_user("user-003")
    params = torch.load(io.BytesIO(blob), weights_only=True)["tensors"]
    assert set(params) == set(w) and torch.equal(params["w_ih"], w["w_ih"][3])
    # Re-import edited parameters: only that user's row changes, in a new version.
    edited = {k: v + 1 for k, v in params.items()}
    buf = io.BytesIO()
    torch.save({"format": "warmcast-user-params/1", "model": "lstm", "version": v1, "user_id": "user-003", "tensors": edited}, buf)
    v2 = store.import_user(buf.getvalue())
    new = store.load_latest()
    assert new.version == v2 and new.user_ids == _users(5)
    assert torch.equal(new.user_params("user-003")["w_ih"], w["w_ih"][3] + 1)
    for u in ("user-000", "user-002", "user-004"):
        assert torch.equal(new.user_params(u)["w_ih"], w["w_ih"][int(u[-1])])
    assert new.metadata["imported_user"]["user_id"] == "user-003" and new.metadata["base_version"] == v1
    assert new.metadata["hidden"] == 12  # hyper-parameters carry over
    # Import into another model under a new id (e.g. warm start from the global model).
    other = ModelStore(str(tmp_path), "lstm-eu")
    other.save(["x"], _weights(1, seed=9))
    other.import_user(blob, user_id="newcomer")
    assert other.load_latest().user_ids == ["x", "newcomer"]
    assert torch.equal(other.load_latest().user_params("newcomer")["w_ih"], w["w_ih"][3])
    small = ModelStore(str(tmp_path), "small")
    small.save(["a"], {"w_ih": torch.zeros(1, 2)})
    with pytest.raises(ModelStoreError, match="do not match"):
        small.import_user(blob)
    with pytest.raises(KeyError, match="nobody"):
        store.export_user("nobody")


def test_user_ids_never_become_paths(tmp_path):
    lake = tmp_path / "lake"
    store = ModelStore(str(lake), "lstm")
    evil = ["../../x", "/etc/passwd", "a/b", "..", "", "with\nnewline"]
    v = store.save(evil, _weights(len(evil)))
    files = [os.path.relpath(p, lake) for p in store.loc.list_files(str(lake))]
    assert all(f.startswith(f"models/lstm/versions/{v}/") or f == "models/lstm/latest" for f in files), files
    assert not (tmp_path / "x").exists()
    assert store.load_latest().user_ids == evil
    assert torch.equal(store.load_version(v, ["../../x"]).weights["w_ih"][0], _weights(len(evil))["w_ih"][0])
    assert len(store.export_user("../../x")) > 0
    for bad in ("../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="not a well-formed identifier"):
            ModelStore(str(lake), bad)
    with pytest.raises(ValueError):
        store.load_version("../../etc")


def test_published_versions_are_immutable(tmp_path):
    store = ModelStore(str(tmp_path), "lstm")
    v = store.save(_users(2), _weights(2))
    with pytest.raises(ModelStoreError, match="immutable"):
        store.write_shard(v, 5, ["z"], _weights(1))
    with pytest.raises(ValueError, match="leading dimension"):
        store.save(_users(3), _weights(2))
    s0 = store.write_shard("manual", 0, ["a", "b"], _weights(2))
    s1 = store.write_shard("manual", 1, ["b"], _weights(1))
    with pytest.raises(ValueError, match="more than one shard"):
        store.publish("manual", [s0, s1])
    s1 = store.write_shard("manual", 1, ["c"], _weights(1))
    store.publish("manual", [json.loads(json.dumps(s.__dict__)) for s in (s0, s1)], set_latest=False)
    assert store.latest_version() == v and store.load_version("manual").user_ids == ["a", "b", "c"]
    store.set_latest("manual")
    assert store.load_latest().version == "manual"


def test_s3_round_trip(s3_endpoint):
    lake = open_location("s3://warmcast-test/lake", s3_endpoint)
    store = ModelStore(lake, "lstm")
    w = _weights(5)
    v1 = store.save(_users(5), w, shard_size=2, training_window=WINDOW)
    assert store.versions() == [v1] and store.latest_version() == v1
    model = store.load_latest()
    assert model.user_ids == _users(5) and torch.equal(model.weights["bias"], w["bias"])
    v2 = store.import_user(store.export_user("user-004"), user_id="user-new")
    assert store.versions() == [v1, v2]
    assert torch.equal(store.load_latest().user_params("user-new")["w_ih"], w["w_ih"][4])
    # A half-written version on S3 is invisible too.
    store.write_shard("orphan", 0, ["a"], _weights(1))
    assert store.versions() == [v1, v2]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="warmcast-test")["Contents"]]
    assert all(k.startswith("lake/models/lstm/") for k in keys) and not any("/." in k for k in keys)
    # Verified and deleted on S3 too: every object of the version goes, the rest stays.
    assert store.verify(v2) == {"users": 6, "shards": 3, "bytes": sum(s["bytes"] for s in store.manifest(v2)["shards"])}
    with pytest.raises(ModelStoreError, match="is latest"):
        store.delete_version(v2)
    assert store.delete_version(v1) == 1 + 3 * 2 + 2  # manifest, 3 shards x (weights, users), index, metadata
    assert store.versions() == [v2] and store.load_latest().version == v2
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="warmcast-test")["Contents"]]
    assert not any(f"/{v1}/" in k for k in keys) and any(f"/{v2}/" in k for k in keys)


def test_version_trained_before_never_picks_a_model_that_saw_later_data(tmp_path):
    from datetime import timedelta

    store = ModelStore(str(tmp_path), "lstm")
    d = WINDOW[1]
    old = store.save(_users(3), _weights(3), training_window=(d - timedelta(days=14), d))
    new = store.save(_users(3), _weights(3, seed=1), training_window=(d - timedelta(days=13), d + timedelta(days=1)))
    assert store.latest_version() == new
    assert store.version_trained_before(d + timedelta(days=2)) == new  # latest qualifies: used (rollbacks respected)
    assert store.version_trained_before(d + timedelta(days=1)) == new
    assert store.version_trained_before(d + timedelta(days=1), strict=True) == old
    assert store.version_trained_before(d + timedelta(hours=12)) == old  # latest saw data after then
    assert store.version_trained_before(d - timedelta(seconds=1)) is None
    store.set_latest(old)  # a rollback wins wherever it qualifies
    assert store.version_trained_before(d + timedelta(days=2)) == old
    assert store.training_window(new) == (d - timedelta(days=13), d + timedelta(days=1))
    assert store.manifest(new)["training_window"]["end"] == (d + timedelta(days=1)).isoformat()
    untimed = store.save(_users(1), _weights(1))  # no window recorded: never chosen
    assert store.training_window(untimed) is None and store.version_trained_before(d + timedelta(days=9)) in (old, new)


def test_read_shard_reads_an_unpublished_shard_and_checks_it(tmp_path):
    store = ModelStore(str(tmp_path), "lstm")
    info = store.write_shard("v1", 0, _users(2), _weights(2))
    users, weights = store.read_shard("v1", info)
    assert users == _users(2) and torch.equal(weights["w_ih"], _weights(2)["w_ih"])
    assert store.versions() == []  # still unpublished
    path = tmp_path / "models" / "lstm" / "versions" / "v1" / info.file
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptModelError, match="corrupt or truncated"):
        store.read_shard("v1", info)
