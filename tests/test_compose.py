"""The production stack (docker-compose.yml, Dockerfile, deploy/entrypoint.sh) without Docker.

No Docker daemon runs where these tests run, so they read the files and check what would break
the stack: interpolation, images and build contexts, ``depends_on`` conditions, the shared
Airflow environment (executor, metadata DB, broker, execution API), published ports, secrets,
that every ``airflow`` and ``warmcast`` command line used parses with this repo's Airflow and CLI,
the warmcast settings the containers get, and the Dockerfile's layout (DAGs folder, non-root
user, install through constraints.txt). The checkers are also run on broken input, so that each
one can be seen to fail.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
README = ROOT / "README.md"

#: The entry point's own modes (deploy/entrypoint.sh); any other command is an airflow subcommand.
ENTRYPOINT_MODES = {"init", "aws-demo", "warmcast"}
#: Keys whose value is a secret; a ``*_FILE`` / ``*_PATH`` key names where one is, not the secret.
SECRET_KEY = re.compile(r"password|secret|fernet|token|key", re.I)
NOT_SECRET_KEY = re.compile(r"_(FILE|PATH)$", re.I)
#: A compose variable reference: ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?msg}, ${NAME?msg}.
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
#: The celery provider the Dockerfile installs, and the `airflow celery` command lines checked by
#: hand against that version's airflow/providers/celery/cli/definition.py (the provider is not in
#: the dev venv, so its parser cannot be built here). Bumping the pin fails the test until the new
#: version's commands are checked again.
CELERY_PROVIDER = "apache-airflow-providers-celery==3.26.0"
CELERY_ARGVS_CHECKED = {("celery", "worker"), ("celery", "flower")}
CELERY_APP = "airflow.providers.celery.executors.celery_executor.app"


# ---------------------------------------------------------------------------------------------
# Reading the files


def load_compose(text: str | None = None) -> dict:
    return yaml.safe_load(COMPOSE.read_text() if text is None else text)


def references(text: str) -> list[tuple[str, str, str]]:
    """Every ``${...}`` in ``text`` as (name, operator, argument); raises on a malformed ``$``."""
    unescaped = text.replace("$$", "")
    found = REFERENCE.findall(unescaped)
    stray = REFERENCE.sub("", unescaped)
    if "$" in stray:
        i = stray.index("$")
        raise ValueError(f"a '$' that is not ${{NAME...}} nor '$$' (compose would interpolate it): {stray[i:i + 30]!r}")
    return found


def interpolate(value, env: dict[str, str]):
    """``value`` (a compose scalar, list or mapping) with every ``${...}`` resolved as compose does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def resolve(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        have = env.get(name)
        if op.startswith(":") and not have or not op.startswith(":") and have is None:
            if op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            return arg if op.endswith("-") else ""
        return have

    parts = value.split("$$")
    return "$".join(REFERENCE.sub(resolve, p) for p in parts)


def required_variables(text: str) -> set[str]:
    return {name for name, op, _ in references(text) if op.endswith("?")}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_argv(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def airflow_argv(service: dict) -> list[str] | None:
    """The airflow subcommand a warmcast-image service runs through the entry point, or None."""
    argv = command_argv(service)
    return argv if argv and argv[0] not in ENTRYPOINT_MODES else None


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split on |, ||, &&, ;), each as argv."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out, cur = [], []
    for tok in lexer:
        if tok in {"|", "||", "&&", ";", "&"}:
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    return [c for c in out + [cur] if c]


def healthcheck_commands(service: dict) -> list[list[str]]:
    test = (service.get("healthcheck") or {}).get("test") or []
    if isinstance(test, str):
        return shell_commands(test)
    if not test:
        return []
    if test[0] == "CMD-SHELL":
        return shell_commands(" ".join(test[1:]))
    if test[0] == "CMD":
        return [list(test[1:])]
    return []


def script_commands(prog: str) -> list[list[str]]:
    """``prog ...`` command lines of deploy/entrypoint.sh (outside heredocs; ``"$@"`` excluded)."""
    out = []
    for line in ENTRYPOINT.read_text().splitlines():
        line = line.strip()
        if line.startswith(prog + " ") and "$@" not in line:
            out.extend(c for c in shell_commands(line) if c[0] == prog)
    return out


def builds_warmcast_image(service: dict) -> bool:
    return (service.get("build") or {}).get("context") == "."


def secret_violations(doc: dict) -> list[str]:
    """Literal secrets in a compose document (before interpolation): a secret-named key whose value
    is not a reference (a non-empty ``:-`` default would be a literal), and a URL password or
    ``--requirepass`` argument that is not one."""
    bad = []

    def is_reference(value: str) -> bool:
        if re.fullmatch(r"\"?\$\$\{?\w+\}?\"?", value):  # $$VAR: a variable of the container's own
            return True
        m = REFERENCE.fullmatch(value)
        return bool(m) and (not (m.group(2) or "").endswith("-") or m.group(3) == "")

    def literal_url_passwords(text: str) -> list[str]:
        refs: dict[str, str] = {}

        def token(m: re.Match) -> str:
            refs[f"REF{len(refs):04d}"] = m.group(0)
            return f"REF{len(refs) - 1:04d}"

        out = []
        for word in re.split(r"\s+", REFERENCE.sub(token, text)):
            if "://" in word and "@" in word:
                password = urlsplit(word.strip("'\"")).password
                if password and not is_reference(refs.get(password, password)):
                    out.append(word)
        return out

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, (str, int, float)) and SECRET_KEY.search(str(k)) and not NOT_SECRET_KEY.search(str(k)):
                    if not is_reference(str(v)):
                        bad.append(f"{where}.{k}")
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
                if v == "--requirepass" and i + 1 < len(node) and not is_reference(str(node[i + 1])):
                    bad.append(f"{where}[{i + 1}]")
        elif isinstance(node, str):
            bad.extend(f"{where}: {word}" for word in literal_url_passwords(node))
            m = re.search(r"--requirepass\s+(\S+)", node)
            if m and not is_reference(m.group(1).rstrip("'")):
                bad.append(f"{where}: --requirepass")

    walk(doc, "compose")
    return bad


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines, cur = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        cur += raw.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            word, _, rest = cur.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
        cur = ""
    return lines


def dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    return any(fnmatch.fnmatch("/".join(parts[: i + 1]), p.removeprefix("**/")) or fnmatch.fnmatch(parts[i], p.removeprefix("**/"))
               for p in patterns for i in range(len(parts)))


#: Values for the required variables, standing in for the operator's .env.
OPERATOR_ENV = {name: f"x{name.lower()}" for name in required_variables(COMPOSE.read_text())} | {
    "AIRFLOW__WARMCAST__START_DATE": "2026-11-02T00:00:00+00:00",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(load_compose(), OPERATOR_ENV)


@pytest.fixture(scope="module")
def airflow_services(compose) -> dict[str, dict]:
    """Services of the warmcast image that run airflow (or the init / CLI modes with its env)."""
    return {n: s for n, s in compose["services"].items() if builds_warmcast_image(s) and n != "aws-local"}


# ---------------------------------------------------------------------------------------------
# Interpolation, images, dependencies


def test_every_dollar_is_a_reference_and_required_variables_are_documented():
    text = COMPOSE.read_text()
    refs = references(text)
    assert refs, "docker-compose.yml takes nothing from the environment"
    required = required_variables(text)
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "FORECAST_STORE_PASSWORD", "AIRFLOW__CORE__FERNET_KEY",
            "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD"} <= required
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    section = README.read_text().split("## Production stack (docker compose)", 1)
    assert len(section) == 2, "README.md has no 'Production stack (docker compose)' section"
    for name in required:
        assert name in header, f"{name} is required but not documented in docker-compose.yml's header"
        assert name in section[1].split("\n## ", 1)[0], f"{name} is required but not in the README section"
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(load_compose(), {k: v for k, v in OPERATOR_ENV.items() if k != "POSTGRES_PASSWORD"})
    with pytest.raises(ValueError, match="HOSTNAME"):
        references('test: airflow jobs check --hostname "$HOSTNAME"')


def test_every_service_has_an_image_or_a_build_that_exists(compose):
    for name, service in compose["services"].items():
        assert service.get("image") or service.get("build"), f"{name}: neither image nor build"
        if build := service.get("build"):
            assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file(), name
        else:
            repo, _, tag = service["image"].partition(":")
            assert tag and tag != "latest", f"{name}: image {service['image']} is not pinned to a tag"
    assert builds_warmcast_image(compose["services"]["airflow-worker"])


def test_depends_on_names_defined_services_with_the_conditions_they_can_meet(compose):
    services = compose["services"]
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        deps = {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps
        if (mode := service.get("network_mode", "")).startswith("service:"):
            assert mode.removeprefix("service:") in deps, f"{name}: network_mode {mode} without depends_on"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on undefined service {dep}"
            assert dep != name
            condition = spec.get("condition", "service_started")
            if condition == "service_healthy":
                test = (services[dep].get("healthcheck") or {}).get("test")
                assert test and test != ["NONE"] and not services[dep]["healthcheck"].get("disable"), \
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert str(services[dep].get("restart", "no")) == "no", f"{dep} is one-shot but restarts"
            else:
                assert condition == "service_started", f"{name}: unknown condition {condition}"
            assert "profiles" not in services[dep] or set(services[dep]["profiles"]) <= set(service.get("profiles", [])), \
                f"{name} depends on {dep}, which only starts with a profile {name} does not have"
    # every long-running Airflow component (not the one-shot init) can be watched
    for name, service in services.items():
        if name not in {"airflow-init", "warmcast-cli"}:
            assert (service.get("healthcheck") or {}).get("test"), f"{name} has no healthcheck"


def test_named_volumes_are_declared_and_the_lake_and_landing_are_volumes(compose, airflow_services):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for spec in service.get("volumes") or []:
            source = spec.split(":")[0] if isinstance(spec, str) else spec.get("source", "")
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
    worker = compose["services"]["airflow-worker"]
    mounts = {spec.split(":")[1]: spec.split(":")[0] for spec in worker["volumes"]}
    env = environment(worker)
    assert mounts.get(env["WARMCAST_LAKE"]) == "lake"
    assert mounts.get(env["WARMCAST_LANDING"]) == "landing"


# ---------------------------------------------------------------------------------------------
# The Airflow environment


def test_airflow_services_share_one_environment(compose, airflow_services):
    common = environment(compose["x-airflow-common"])
    assert common["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND",
                "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
                "AIRFLOW__CORE__DAGS_FOLDER", "WARMCAST_STORE_URL"):
        assert common.get(key), f"x-airflow-common lacks {key}"
    assert {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer", "airflow-worker"} <= set(airflow_services)
    for name, service in airflow_services.items():
        env = environment(service)
        differs = {k for k, v in common.items() if env.get(k) != v}
        assert not differs, f"{name} does not carry the common Airflow environment: {sorted(differs)}"


def test_airflow_urls_point_at_the_services_that_serve_them(compose):
    services = compose["services"]
    env = environment(compose["x-airflow-common"])
    pg_env = environment(services["postgres"])

    db = urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert db.scheme == "postgresql+psycopg", "the venv has psycopg 3, not psycopg2"
    assert (db.hostname, db.port, db.username, db.password, db.path) == \
        ("postgres", 5432, pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], "/" + pg_env["POSTGRES_DB"])
    backend = urlsplit(env["AIRFLOW__CELERY__RESULT_BACKEND"].removeprefix("db+"))
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg://")
    assert (backend.hostname, backend.username, backend.password) == (db.hostname, db.username, db.password)

    broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname in services and "redis" in services[broker.hostname]["image"]
    assert broker.password == environment(services[broker.hostname])["REDIS_PASSWORD"]

    execution = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    api = services[execution.hostname]
    assert command_argv(api) == ["api-server"] and execution.path == "/execution/"
    assert execution.port == int(environment(api).get("AIRFLOW__API__PORT", 8080))
    assert any(str(p).endswith(f":{execution.port}") for p in api["ports"])

    store = urlsplit(env["WARMCAST_STORE_URL"])
    assert store.hostname == "postgres" and store.username and store.password and store.path == "/warmcast"
    assert store.username != db.username, "the forecast store should not log in as the metadata DB's superuser"


def test_ports_are_published_on_localhost_only(compose):
    published = 0
    for name, service in compose["services"].items():
        for port in service.get("ports") or []:
            published += 1
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:  # HOST_IP:HOST_PORT:CONTAINER_PORT; a shorter form binds every interface
                host_ip = str(port).split(":")[0] if str(port).count(":") == 2 else None
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond 127.0.0.1"
    assert published >= 1


def test_no_literal_secrets():
    raw = load_compose()
    assert secret_violations(raw) == []
    assert secret_violations(raw["services"]["airflow-init"]) == []
    # the checker catches each kind of literal secret
    assert secret_violations({"environment": {"POSTGRES_PASSWORD": "airflow"}})
    assert secret_violations({"environment": {"AIRFLOW__CORE__FERNET_KEY": "${FERNET:-abc}"}})
    assert secret_violations({"environment": {"CONN": "postgresql://u:hunter2@db/x"}})
    assert secret_violations({"command": ["redis-server", "--requirepass", "hunter2"]})
    assert not secret_violations({"environment": {"X_PASSWORD": "${X_PASSWORD:?set it}", "X_KEY_FILE": "/run/x"}})


# ---------------------------------------------------------------------------------------------
# The commands the stack runs


AIRFLOW_PARSE = """
import json, sys
from airflow.cli.cli_parser import get_parser
parser, out = get_parser(), []
for argv in json.loads(sys.argv[1]):
    try:
        parser.parse_args(argv)
        out.append(None)
    except SystemExit as exc:
        out.append(exc.code)
print(json.dumps(out))
"""


def parse_with_airflow(argvs: list[list[str]], tmp_path: Path) -> list:
    env = {"PATH": str(Path(sys.executable).parent), "AIRFLOW_HOME": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", AIRFLOW_PARSE, json.dumps(argvs)], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_airflow_command_lines_parse_with_this_airflow(compose, tmp_path):
    argvs = []
    for name, service in compose["services"].items():
        if builds_warmcast_image(service) and (argv := airflow_argv(service)):
            argvs.append(argv)
        argvs += [c[1:] for c in healthcheck_commands(service) if c[0] == "airflow"]
    argvs += [c[1:] for c in script_commands("airflow")]
    argvs = [[a.replace("${HOSTNAME}", "host") for a in argv] for argv in argvs]
    assert ["db", "migrate"] in argvs and ["celery", "worker"] in argvs and ["api-server"] in argvs

    celery = [a for a in argvs if a[0] == "celery"]
    core = [a for a in argvs if a[0] != "celery"] + [["db", "no-such-subcommand"]]
    results = parse_with_airflow(core, tmp_path)
    assert results[-1] not in (None, 0), "the parser accepted a subcommand that does not exist"
    failed = [argv for argv, code in zip(core[:-1], results[:-1]) if code not in (None, 0)]
    assert not failed, f"not airflow {sorted(map(tuple, failed))} in this Airflow"

    # `airflow celery ...` comes from the provider the Dockerfile installs (not in the dev venv)
    assert CELERY_PROVIDER in DOCKERFILE.read_text(), "the Dockerfile does not install the checked celery provider"
    for argv in celery:
        assert tuple(argv[:2]) in CELERY_ARGVS_CHECKED and len(argv) == 2, f"airflow {argv}: not checked"
    for name, service in compose["services"].items():
        for c in healthcheck_commands(service):
            if c[0] == "celery":
                assert c[c.index("--app") + 1] == CELERY_APP, name


def test_warmcast_command_lines_parse(compose):
    argvs = [c[1:] for c in script_commands("warmcast")]
    for service in compose["services"].values():
        argv = command_argv(service)
        if argv[:1] == ["warmcast"] and argv[1:] != ["--help"]:
            argvs.append(argv[1:])
    assert ["aws", "local-endpoint", "--port", "5000"] in argvs
    parser = build_parser()
    for argv in argvs:
        parser.parse_args(argv)  # SystemExit(2) on an unknown subcommand or flag
    with pytest.raises(SystemExit):
        parser.parse_args(["aws", "local-endpoints"])
    # the demo endpoint's healthcheck probes the port the script starts it on
    probe = " ".join(compose["services"]["aws-local"]["healthcheck"]["test"])
    assert "('127.0.0.1', 5000)" in probe


def test_warmcast_settings_load_from_the_containers_environment(compose, airflow_services):
    for name, service in airflow_services.items():
        env = environment(service)
        settings = load_settings(environ={k: v for k, v in env.items() if k.startswith("WARMCAST_")})
        assert settings.store_url.startswith("postgresql+psycopg://"), name
        assert settings.lake == "/opt/warmcast/var/lake", name
    with pytest.raises(Exception, match="(?i)store_uri|unknown"):
        load_settings(environ={"WARMCAST_STORE_URI": "x"})


# ---------------------------------------------------------------------------------------------
# The Dockerfile


def test_dockerfile_layout(compose):
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image runs as root"

    copies = [args.split() for op, args in steps if op == "COPY"]
    for *sources, dest in copies:
        for src in sources:
            assert not src.startswith("--"), f"COPY {src}: flags need BuildKit; keep the Dockerfile plain"
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not dockerignored(src.rstrip("/")), f"COPY {src}: excluded by .dockerignore"
    dags_dest = [dest for *sources, dest in copies if sources == ["dags/"]]
    assert dags_dest, "the Dockerfile does not copy dags/"
    assert dags_dest[0].rstrip("/") == environment(compose["x-airflow-common"])["AIRFLOW__CORE__DAGS_FOLDER"]

    # the project installs through constraints.txt, after everything its build reads is copied
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    install = next(i for i, (op, args) in enumerate(steps) if op == "RUN" and "-c constraints.txt" in args and " . " in args + " ")
    copied_before = {src.rstrip("/") for op, args in steps[:install] if op == "COPY" for src in args.split()[:-1]}
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {"pyproject.toml", "constraints.txt", pyproject["project"]["readme"]} | packages
    assert needed <= copied_before, f"not copied before pip install: {needed - copied_before}"
    assert "torch==2.13.0" in pyproject["project"]["dependencies"]
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().splitlines()

    entry = [args for op, args in steps if op == "ENTRYPOINT"][-1]
    assert json.loads(entry) == ["/usr/local/bin/warmcast-entrypoint"]
    assert any(dest == "/usr/local/bin/warmcast-entrypoint" and sources == ["deploy/entrypoint.sh"] for *sources, dest in copies)
    # every entry-point mode a service uses is handled by the script
    script = ENTRYPOINT.read_text()
    for service in compose["services"].values():
        if builds_warmcast_image(service) and (argv := command_argv(service)) and argv[0] in ENTRYPOINT_MODES:
            assert re.search(rf"^{re.escape(argv[0])}\)", script, re.M), f"entrypoint.sh has no mode {argv[0]}"
    # the volumes' mount points exist in the image, so new volumes are owned by its user
    made = " ".join(args for op, args in steps if op == "RUN")
    for spec in compose["services"]["airflow-worker"]["volumes"] + compose["services"]["airflow-apiserver"]["volumes"]:
        assert spec.split(":")[1] in made, f"{spec}: mount point not created (and chowned) in the image"


def test_dockerignore_checker_can_fail():
    assert dockerignored(".venv/bin/python") and dockerignored("pipeline/__pycache__/x.pyc")
    assert not dockerignored("pipeline/config.py")
