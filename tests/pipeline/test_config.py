"""Settings: defaults < file < WARMCAST_* environment < overrides; clear errors; no secrets shown."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_settings


def test_defaults_need_no_file_and_no_server():
    s = load_settings(environ={})
    assert s.lake == "var/lake" and s.store_url.startswith("sqlite:///")
    assert s.ingest.slot_minutes == 5 and s.aws.retry_mode == "standard"


def test_precedence_file_env_overrides(tmp_path):
    cfg = tmp_path / "warmcast.toml"
    cfg.write_text('lake = "/file/lake"\nlanding = "/file/landing"\n[ingest]\nmax_quarantine_share = 0.2\n[aws]\nregion = "eu-west-1"\n')
    env = {"WARMCAST_LANDING": "/env/landing", "WARMCAST_INGEST__MAX_QUARANTINE_SHARE": "0.3", "OTHER": "x"}
    s = load_settings(cfg, overrides={"lake": None, "landing": "/flag/landing"}, environ=env)
    assert s.lake == "/file/lake"  # a None override (unset flag) does not clobber the file
    assert s.landing == "/flag/landing"
    assert s.ingest.max_quarantine_share == 0.3
    assert s.aws.region == "eu-west-1"


def test_yaml_and_config_from_environment(tmp_path):
    cfg = tmp_path / "w.yaml"
    cfg.write_text("lake: s3://b/lake\naws:\n  endpoint_url: http://127.0.0.1:5000\n")
    s = load_settings(environ={"WARMCAST_CONFIG": str(cfg)})
    assert s.lake == "s3://b/lake" and s.aws.endpoint_url == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WARMCAST_INGEST__SLOT_MINUTES": "five"}, "settings.ingest.slot_minutes='five' is not a valid int"),
        ({"WARMCAST_LAKES": "/x"}, "unknown setting(s) in settings: lakes"),
        ({"WARMCAST_INGEST__NOPE": "1"}, "unknown setting(s) in settings.ingest: nope"),
    ],
)
def test_bad_values_name_the_setting(env, message):
    with pytest.raises(ConfigError) as err:
        load_settings(environ=env)
    assert message in str(err.value)


def test_unreadable_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("lake = [unclosed")
    with pytest.raises(ConfigError, match="does not parse"):
        load_settings(bad, environ={})


def test_password_is_masked_when_printed():
    s = load_settings(overrides={"store_url": "postgresql+psycopg://warmcast:s3cret@db:5432/wc"}, environ={})
    shown = str(s.redacted())
    assert "s3cret" not in shown and "warmcast:***@db:5432/wc" in shown


@pytest.mark.parametrize(
    "key, value, message",
    [("slot_minutes", "7", "must divide an hour"), ("max_quarantine_share", "1.5", "must lie in [0, 1]"), ("threads", "0", "at least 1")],
)
def test_ingest_settings_are_range_checked(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(environ={f"WARMCAST_INGEST__{key.upper()}": value})


def test_non_setting_variables_are_not_refused():
    env = {"WARMCAST_TEST_PG_URL": "postgresql://x", "WARMCAST_TRACE_DIR": "/data", "WARMCAST_LAKE": "/l",
           "WARMCAST_NATIVE": "0", "WARMCAST_NATIVE_CACHE": "/tmp/x"}
    assert load_settings(environ=env).lake == "/l"


def test_dag_sections_have_defaults_and_read_the_environment():
    s = load_settings(environ={"WARMCAST_TRAIN__EPOCHS": "2", "WARMCAST_FORECAST__SHARD_SIZE": "50",
                               "WARMCAST_AGGREGATE__LEVEL": "0.8", "WARMCAST_AGGREGATE__METHOD": "independent_sample",
                               "WARMCAST_TRAIN__THREADS": "none"})
    assert (s.train.epochs, s.train.global_epochs, s.train.days, s.train.threads) == (2, 5, 14.0, None)
    assert s.train.global_max_users == 1024 and s.train.hidden == 64 and s.train.keep_versions is None
    assert (s.forecast.shard_size, s.forecast.fallback) == (50, "last_value")
    assert (s.aggregate.level, s.aggregate.method, s.aggregate.n_paths) == (0.8, "independent_sample", 1000)
    assert s.train.max_shards <= 1024 and s.forecast.max_shards <= 1024


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("TRAIN__DAYS", "1", "train.days=1.0 must lie in [1.5, 366]"),
        ("TRAIN__EPOCHS", "-1", "must be >= 0"),
        ("TRAIN__SHARD_SIZE", "0", "train.shard_size=0 must be at least 1"),
        ("TRAIN__MAX_SHARDS", "1025", "train.max_shards=1025 must lie in [1, 1024]"),
        ("TRAIN__THREADS", "0", "train.threads=0 must be at least 1"),
        ("TRAIN__GLOBAL_MAX_USERS", "0", "train.global_max_users=0 must be at least 1"),
        ("TRAIN__HIDDEN", "0", "train.hidden=0 must lie in [1, 1024]"),
        ("TRAIN__KEEP_VERSIONS", "0", "train.keep_versions=0 must be at least 1"),
        ("FORECAST__MAX_SHARDS", "0", "forecast.max_shards=0 must lie in [1, 1024]"),
        ("FORECAST__FALLBACK", "guess", "forecast.fallback='guess' must be one of last_value"),
        ("AGGREGATE__LEVEL", "1.0", "aggregate.level=1.0 must lie in (0, 1)"),
        ("AGGREGATE__N_PATHS", "1", "aggregate.n_paths=1 must lie in [2, 1000000]"),
        ("AGGREGATE__METHOD", "quantile_sum", "aggregate.method='quantile_sum' must be one of copula_sample"),
        ("AGGREGATE__HISTORY_BUCKETS", "1", "aggregate.history_buckets=1 must be at least 2"),
        ("SCALER__MAX_FORECAST_AGE_S", "0", "scaler.max_forecast_age_s=0.0 must be > 0"),
    ],
)
def test_dag_settings_are_range_checked(key, value, message):
    import re

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(environ={f"WARMCAST_{key}": value})


def test_forecast_fallbacks_are_the_baselines():
    from models.baselines import METHODS
    from pipeline.config import FORECAST_FALLBACKS

    assert FORECAST_FALLBACKS == (*METHODS, "fail")
