"""`warmcast models`: list, verify, promote (roll back), export and import one user — on a real
trained version in a lake, and what the pipeline then forecasts with."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import torch

from models.persist import forecast_users, import_user_params, load_trained, plan_forecast, promote_version, save_trained
from models.store import CorruptModelError, ModelStore, ModelStoreError
from models.train import TrainConfig, train
from pipeline.cli import main
from pipeline.demand import demand_from_lake
from tests.models.test_persist import START, _lake_with_requests

UNTIL = START + timedelta(days=3)


@pytest.fixture(scope="module")
def lake_with_two_versions(tmp_path_factory):
    """A lake of 4 users' requests with two published versions (the second is latest)."""
    tmp = tmp_path_factory.mktemp("models-cli")
    lake = _lake_with_requests(tmp, users=4, days=3.0)
    demand = demand_from_lake(lake, START, UNTIL)
    versions = []
    for seed in (0, 1):
        trained = train(demand, since=START, until=UNTIL, config=TrainConfig(epochs=1, global_epochs=1, hidden=8, seed=seed))
        versions.append(save_trained(lake, trained, fine_tuned_from=versions[-1] if versions else None))
    return lake, versions


def _copy(lake, tmp_path):
    import shutil

    from pipeline.storage import open_location

    shutil.copytree(lake.root, tmp_path / "lake")
    return open_location(str(tmp_path / "lake"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["models", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list_and_verify(lake_with_two_versions, capsys):
    lake, (v1, v2) = lake_with_two_versions
    rc, out, _ = run(capsys, "list", "--lake", lake.root)
    assert rc == 0
    lines = [line for line in out.splitlines() if v1 in line or v2 in line]
    assert len(lines) == 2 and lines[0].startswith(f"  {v1}") and lines[1].startswith(f"* {v2}")
    assert "2026-11-02T00:00 – 2026-11-05T00:00" in lines[1]
    rc, out, _ = run(capsys, "list", "--lake", lake.root, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["version"] for r in rows] == [v1, v2] and [r["latest"] for r in rows] == [False, True]
    assert all(r["users"] == 4 and r["global"] and r["pinball"] > 0 for r in rows)
    assert rows[1]["fine_tuned_from"] == v1 and f"fine-tuned {v1}" in lines[1]
    rc, out, _ = run(capsys, "verify", "--lake", lake.root, "--all")
    assert rc == 0 and out.count("every checksum matches") == 2
    rc, out, _ = run(capsys, "show", v1, "--lake", lake.root)
    assert rc == 0 and json.loads(out)["version"] == v1


def test_verify_names_a_corrupt_file_and_promote_refuses_it(lake_with_two_versions, tmp_path, capsys):
    src, (v1, v2) = lake_with_two_versions
    lake = _copy(src, tmp_path)
    shard = tmp_path / "lake" / "models" / "users" / "versions" / v1 / "shard-00000.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    rc, out, _ = run(capsys, "verify", "--lake", lake.root, "--all")
    assert rc == 1
    assert f"CORRUPT {v1}" in out and "shard-00000.pt is corrupt" in out and f"ok      {v2}" in out
    rc, _, err = run(capsys, "promote", v1, "--lake", lake.root)
    assert rc == 1 and "shard-00000.pt" in err
    assert ModelStore(lake, "users").latest_version() == v2  # untouched
    # the global entry is checked too
    users_file = tmp_path / "lake" / "models" / "global" / "versions" / v2 / "shard-00000.users.parquet"
    users_file.write_bytes(users_file.read_bytes()[:-3])
    with pytest.raises(CorruptModelError, match="global.*shard-00000.users.parquet"):
        promote_version(lake, v2)


def test_promote_rolls_back_what_forecasts_and_training_use(lake_with_two_versions, tmp_path, capsys):
    src, (v1, v2) = lake_with_two_versions
    lake = _copy(src, tmp_path)
    at = UNTIL + timedelta(minutes=30)
    assert plan_forecast(lake, at, 10, 1)[0]["version"] == v2
    rc, out, err = run(capsys, "promote", v1, "--lake", lake.root)
    assert rc == 0 and f"latest: {v2} -> {v1}" in out
    assert ModelStore(lake, "users").latest_version() == v1 and ModelStore(lake, "global").latest_version() == v1
    assert plan_forecast(lake, at, 10, 1)[0]["version"] == v1
    assert load_trained(lake)[0] == v1
    rc, out, _ = run(capsys, "promote", "previous", "--lake", lake.root)  # nothing before v1
    assert rc == 2 and ModelStore(lake, "users").latest_version() == v1
    promote_version(lake, v2)
    rc, out, _ = run(capsys, "promote", "previous", "--lake", lake.root)
    assert rc == 0 and f"latest: {v2} -> {v1}" in out
    rc, _, err = run(capsys, "promote", "20990101T000000000000Z-abcdef", "--lake", lake.root)
    assert rc == 2 and "no published version" in err
    rc, _, err = run(capsys, "promote", "../../etc", "--lake", lake.root)
    assert rc == 2 and "well-formed" in err


def test_export_then_import_a_user_publishes_a_version_the_pipeline_forecasts_with(lake_with_two_versions, tmp_path, capsys):
    src, (v1, v2) = lake_with_two_versions
    lake = _copy(src, tmp_path)
    user = load_trained(lake)[1].user_ids[1]
    blob = tmp_path / "user.pt"
    rc, out, _ = run(capsys, "export-user", user, "--version", v1, "--lake", lake.root, "--out", str(blob))
    assert rc == 0 and blob.stat().st_size > 0
    exported = torch.load(blob, weights_only=True)
    assert exported["version"] == v1 and exported["user_id"] == user
    # v1's parameters for that user, into the latest (v2), under the same id: a new version
    rc, out, _ = run(capsys, "import-user", str(blob), "--lake", lake.root)
    assert rc == 0
    v3 = ModelStore(lake, "users").latest_version()
    assert v3 not in (v1, v2) and f"published model version {v3} (now latest)" in out
    version, models = load_trained(lake)  # both entries exist: the pipeline loads it
    old, new = load_trained(lake, v1)[1], load_trained(lake, v2)[1]
    row = models.user_ids.index(user)
    for name, t in models.model.get_all().items():
        assert torch.equal(t[row], old.model.get_all()[name][old.user_ids.index(user)]), name
        other = 1 - row if row < 2 else 0
        assert torch.equal(t[other], new.model.get_all()[name][new.user_ids.index(models.user_ids[other])]), name
    for name, t in models.global_model.get_all().items():
        assert torch.equal(t, new.global_model.get_all()[name]), name
    assert (models.since, models.until) == (new.since, new.until)
    table = forecast_users(lake, UNTIL + timedelta(minutes=30), [user], plan_forecast(lake, UNTIL + timedelta(minutes=30), 10, 1)[0]["version"])
    assert set(table["model_version"].to_pylist()) == {f"lstm:{v3}"}
    # and as a new user: added, no longer flagged as on the global model
    rc, _, _ = run(capsys, "import-user", str(blob), "--as", "newcomer", "--lake", lake.root, "--no-latest")
    assert rc == 0 and ModelStore(lake, "users").latest_version() == v3
    rows = {r["version"]: r for r in (json.loads(line) for line in (run(capsys, "list", "--json", "--lake", lake.root)[1]).splitlines())}
    v4 = max(rows)
    assert rows[v4]["users"] == 5 and rows[v4]["imported_user"] == "newcomer" and rows[v4]["base_version"] == v3
    assert "newcomer" in load_trained(lake, v4)[1].user_ids


def test_import_into_a_flagged_user_clears_its_global_flag(lake_with_two_versions, tmp_path):
    src, (_, v2) = lake_with_two_versions
    lake = _copy(src, tmp_path)
    users = ModelStore(lake, "users")
    meta = users.metadata(v2)
    user = load_trained(lake)[1].user_ids[0]
    blob = users.export_user(user)
    # a version in which that user was forecast by the global model (too little history)
    flagged = users.import_user(blob, update=lambda m, uid: {"uses_global": [uid]}, set_latest=False, version="flagged")
    glob = ModelStore(lake, "global")
    info = glob.manifest(v2)["shards"][0]
    glob.publish("flagged", [glob.write_shard("flagged", 0, *glob.read_shard(v2, info))], training_window=glob.training_window(v2),
                 set_latest=False)
    assert load_trained(lake, flagged)[1].uses_global.tolist() == [True, False, False, False]
    v = import_user_params(lake, blob, base_version=flagged)
    assert load_trained(lake, v)[1].uses_global.tolist() == [False] * 4
    assert users.metadata(v)["config"] == meta["config"]


def test_bad_invocations_name_the_problem(lake_with_two_versions, tmp_path, capsys):
    lake, (v1, _) = lake_with_two_versions
    rc, _, err = run(capsys, "export-user", "nobody", "--lake", lake.root, "--out", str(tmp_path / "x.pt"))
    assert rc == 2 and "no user 'nobody'" in err
    rc, _, err = run(capsys, "export-user", "nobody", "--lake", lake.root)
    assert rc == 2 and "needs --out" in err
    rc, _, err = run(capsys, "promote", "--lake", lake.root)
    assert rc == 2 and "needs a version" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    before = (ModelStore(lake, "users").versions(), ModelStore(lake, "global").versions())
    rc, _, err = run(capsys, "import-user", str(junk), "--lake", lake.root)
    assert rc == 2 and "not a user-parameter export" in err
    small = tmp_path / "small.pt"
    torch.save({"format": "warmcast-user-params/1", "user_id": "x", "tensors": {"w_in": torch.zeros(2)}}, small)
    rc, _, err = run(capsys, "import-user", str(small), "--lake", lake.root)
    assert rc == 2 and "do not match model 'users'" in err
    assert (ModelStore(lake, "users").versions(), ModelStore(lake, "global").versions()) == before  # nothing written
    empty = tmp_path / "empty"
    rc, out, _ = run(capsys, "list", "--lake", str(empty))
    assert rc == 0 and "no model version" in out
    with pytest.raises(ModelStoreError, match="train one first"):
        from pipeline.storage import open_location

        import_user_params(open_location(str(empty)), b"")
    assert not (tmp_path / "x.pt").exists()  # nothing written for a refused export


def test_prune_keeps_the_newest_and_latest_and_leaves_unpublished_folders(lake_with_two_versions, tmp_path, capsys):
    src, (v1, v2) = lake_with_two_versions
    lake = _copy(src, tmp_path)
    users, glob = ModelStore(lake, "users"), ModelStore(lake, "global")
    blob = users.export_user(load_trained(lake)[1].user_ids[0])
    v3 = import_user_params(lake, blob, set_latest=False)  # newest, not latest
    users.write_shard("in-progress", 0, ["a"], {"w": torch.zeros(1, 2)})  # a training run writing its shards
    glob.write_shard("in-progress", 0, ["global"], {"w": torch.zeros(1, 2)})
    rc, out, _ = run(capsys, "prune", "--keep", "1", "--dry-run", "--lake", lake.root)
    assert rc == 0 and out.splitlines() == ["would delete 1 version(s)", f"  {v1}"]
    assert users.versions() == [v1, v2, v3]
    rc, out, _ = run(capsys, "prune", "--keep", "1", "--lake", lake.root)
    assert rc == 0 and f"deleted 1 version(s)\n  {v1}" in out
    assert users.versions() == [v2, v3] and glob.versions() == [v2, v3]  # v2 is latest: kept
    assert not (tmp_path / "lake" / "models" / "global" / "versions" / v1).exists()
    assert (tmp_path / "lake" / "models" / "users" / "versions" / "in-progress" / "shard-00000.pt").is_file()
    assert load_trained(lake)[0] == v2 and load_trained(lake, v3)[0] == v3
    with pytest.raises(ModelStoreError, match="is latest"):
        users.delete_version(v2)
    rc, _, err = run(capsys, "prune", "--lake", lake.root)
    assert rc == 2 and "needs --keep" in err
    rc, _, err = run(capsys, "prune", "--keep", "0", "--lake", lake.root)
    assert rc == 2 and "at least the newest" in err


def test_prune_deletes_an_old_global_entry_whose_users_entry_was_never_published(lake_with_two_versions, tmp_path):
    from models.persist import prune_versions

    src, (v1, v2) = lake_with_two_versions
    lake = _copy(src, tmp_path)
    glob = ModelStore(lake, "global")
    info = glob.manifest(v1)["shards"][0]
    # a publish that failed between its two entries, before v1 and v2 ...
    orphan = "20000101T000000000000Z-0rphan"
    glob.publish(orphan, [glob.write_shard(orphan, 0, *glob.read_shard(v1, info))], set_latest=False)
    manifest = tmp_path / "lake" / "models" / "global" / "versions" / orphan / "MANIFEST.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"created_at": "2000-01-01T00:00:00+00:00"}))
    assert prune_versions(lake, 2) == [orphan]
    # ... and one newer than every version kept may be a publish in progress: left alone
    glob.publish("in-flight", [glob.write_shard("in-flight", 0, *glob.read_shard(v1, info))], set_latest=False)
    assert prune_versions(lake, 1) == [v1] and "in-flight" in glob.versions()


def _flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("entry,file", [("users", "shard-00000.pt"), ("global", "shard-00000.pt"), ("users", "index.parquet")])
def test_a_corrupt_version_is_not_served_the_previous_one_is(lake_with_two_versions, tmp_path, caplog, entry, file):
    from models.persist import forecast_from_lake

    src, (v1, v2) = lake_with_two_versions
    lake = _copy(src, tmp_path)
    at = UNTIL + timedelta(minutes=30)
    users = load_trained(lake)[1].user_ids
    expected = forecast_users(lake, at, users, v1)
    _flip(tmp_path / "lake" / "models" / entry / "versions" / v2 / file)
    plan = plan_forecast(lake, at, 10, 1)[0]
    assert plan["version"] == (v1 if file == "index.parquet" else v2)
    table = forecast_users(lake, at, users, v2)
    assert {v.split("+")[0] for v in table["model_version"].to_pylist()} == {f"lstm:{v1}"}  # "+global": users on it
    assert table.equals(expected)  # exactly what the previous version forecasts
    assert f"{file} is corrupt" in caplog.text and "serving the newest older model version" in caplog.text
    assert forecast_from_lake(lake, at).equals(expected)
    # nothing intact: the fallback baseline (flagged), or the error with fallback = fail
    _flip(tmp_path / "lake" / "models" / "users" / "versions" / v1 / "shard-00000.pt")
    table = forecast_users(lake, at, users, v2)
    assert set(table["model_version"].to_pylist()) == {"fallback:baseline:last_value"}
    with pytest.raises(CorruptModelError, match=file):
        forecast_users(lake, at, users, v2, fallback="fail")


def test_forecast_uses_the_version_trained_before_its_issue_time(lake_with_two_versions, tmp_path):
    from models.persist import forecast_from_lake

    src, (v1, v2) = lake_with_two_versions
    lake = _copy(src, tmp_path)
    with pytest.raises(ValueError, match="no model version .* was trained on data before .*run `warmcast train` first"):
        forecast_from_lake(lake, UNTIL - timedelta(hours=1))  # both were trained on data up to UNTIL
    table = forecast_from_lake(lake, UNTIL + timedelta(minutes=30))
    assert {v.split("+")[0] for v in table["model_version"].to_pylist()} == {f"lstm:{v2}"}
