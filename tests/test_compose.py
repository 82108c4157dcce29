"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The compose file is parsed as YAML (anchors and merge keys resolved the way Compose does) and
held against the code: commands must parse with the real ``cxr`` parser, variables must be real
settings, and the mounts must land where the settings put the data folders.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from worker.cli import build_parser
from worker.ops.flower import check_flower_settings
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict = COMPOSE["services"]
CXR_SERVICES = ["migrate", "watcher", "worker", "worker-cpu", "flower"]
WORKERS = ["worker", "worker-cpu"]
RUNNING = ["watcher", "worker", "worker-cpu", "flower"]

# What a user puts in .env next to the compose file.
DOTENV = {
    "POSTGRES_PASSWORD": "pg-secret",
    "REDIS_PASSWORD": "redis-secret",
    "FLOWER_BASIC_AUTH": "admin:flower-secret",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` (``$$`` is a literal $)."""

    def replace(match: re.Match) -> str:
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op == "?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == "-" else ""

    return _VARIABLE.sub(replace, value.replace("$$", "\0")).replace("\0", "$")


def environment(service: str, env: dict[str, str] | None = None) -> dict[str, str]:
    raw = SERVICES[service].get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: interpolate(str(v), DOTENV if env is None else env) for k, v in raw.items()}


def mounts(service: str) -> dict[str, str]:
    """Container path -> volume name (or host path), read-only flag dropped."""
    result = {}
    for entry in SERVICES[service].get("volumes", []):
        if isinstance(entry, dict):
            result[entry["target"]] = entry["source"]
        else:
            source, target = entry.split(":")[:2]
            result[target] = source
    return result


def settings_for(service: str) -> Settings:
    env = environment(service)
    fields = {name[4:].lower(): value for name, value in env.items() if name.startswith("CXR_")}
    return Settings(_env_file=None, **fields)


def test_all_services_exist():
    assert set(SERVICES) >= {"redis", "postgres", *CXR_SERVICES}


@pytest.mark.parametrize("service", CXR_SERVICES + ["cli"])
def test_commands_are_real_cxr_subcommands(service):
    command = SERVICES[service]["command"]
    assert isinstance(command, list), "exec form, so no shell mangles arguments"
    try:
        args = build_parser().parse_args(command)
    except SystemExit as exc:
        pytest.fail(f"`cxr {' '.join(command)}` does not parse (exit {exc.code})")
    assert callable(args.func)


def test_expected_commands():
    assert SERVICES["migrate"]["command"] == ["db", "upgrade"]
    assert SERVICES["watcher"]["command"] == ["watch"]
    assert SERVICES["worker"]["command"] == ["worker"]
    assert SERVICES["worker-cpu"]["command"] == ["worker"]
    assert SERVICES["flower"]["command"] == ["flower"]


@pytest.mark.parametrize("service", CXR_SERVICES + ["cli"])
def test_environment_holds_only_real_settings(service):
    env = environment(service)
    unknown = {
        name
        for name in env
        if name.startswith("CXR_") and name[4:].lower() not in Settings.model_fields
    }
    assert not unknown
    assert {"CXR_DATA_DIR", "CXR_DATABASE_URL", "CXR_BROKER_URL", "CXR_QUEUE"} <= set(env)


@pytest.mark.parametrize("service", CXR_SERVICES)
def test_services_reach_the_compose_postgres_and_redis(service):
    settings = settings_for(service)
    db = urlsplit(settings.db_url)
    broker = urlsplit(settings.broker_url)
    assert db.scheme == "postgresql+psycopg"
    assert db.hostname == "postgres" and db.password == DOTENV["POSTGRES_PASSWORD"]
    assert broker.scheme == "redis"
    assert broker.hostname == "redis" and broker.password == DOTENV["REDIS_PASSWORD"]
    assert SERVICES["postgres"]["environment"]["POSTGRES_USER"] == db.username
    assert SERVICES["postgres"]["environment"]["POSTGRES_DB"] == db.path.lstrip("/")


def test_passwords_are_required_not_defaulted():
    for name in DOTENV:
        missing = {k: v for k, v in DOTENV.items() if k != name}
        with pytest.raises(KeyError, match=name):
            for service in CXR_SERVICES:
                environment(service, missing)


def test_mounts_land_on_the_settings_paths():
    for service in RUNNING:
        settings = settings_for(service)
        expected = {
            str(settings.inbox_dir): "inbox",
            str(settings.archive_dir): "archive",
            str(settings.rejected_dir): "rejected",
            str(settings.models_path): "models",
            str(settings.heatmaps_dir): "heatmaps",
        }
        for target, source in mounts(service).items():
            assert expected.get(target) == source, f"{service}: {source} on {target}"


def test_volumes_shared_where_the_pipeline_needs_them():
    named = set(COMPOSE["volumes"])
    for service in SERVICES:
        for source in mounts(service).values():
            assert source.startswith((".", "/")) or source in named, f"{service}: {source}"
    watcher, workers = mounts("watcher"), [mounts(w) for w in WORKERS]
    assert watcher["/data/inbox"] == "inbox"
    for worker in workers:
        assert worker["/data/archive"] == watcher["/data/archive"]
        assert worker["/data/rejected"] == watcher["/data/rejected"]
        assert worker["/data/models"] == "models"
    inbox_users = {s for s in RUNNING if "inbox" in mounts(s).values()}
    assert inbox_users == {"watcher"}
    for worker in WORKERS:
        models = [v for v in SERVICES[worker]["volumes"] if str(v).startswith("models:")]
        assert models and str(models[0]).endswith(":ro"), "workers only read bundles"


def test_dicom_services_in_their_own_profile():
    """The listener writes the inbox the watcher reads; the sender reads the archive and the
    heatmaps the workers write; both only with the profile dicom."""
    for service, command in (("dicom-listener", ["dicom", "listen"]),
                             ("dicom-sender", ["dicom", "send"])):
        spec = SERVICES[service]
        assert spec["profiles"] == ["dicom"] and spec["command"] == command
        assert callable(build_parser().parse_args(command).func)
        assert all(n[4:].lower() in Settings.model_fields for n in environment(service)
                   if n.startswith("CXR_"))
    assert mounts("dicom-listener") == {"/data/inbox": mounts("watcher")["/data/inbox"]}
    assert settings_for("dicom-listener").dicom_port == 11112
    sender = mounts("dicom-sender")
    assert sender["/data/archive"] == mounts("watcher")["/data/archive"]
    assert all(sender["/data/heatmaps"] == mounts(w)["/data/heatmaps"] for w in WORKERS)


def test_start_order():
    for service in RUNNING:
        if service == "flower":
            continue
        depends = SERVICES[service]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["postgres"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["restart"] == "no"
    assert SERVICES["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_gpu_and_cpu_workers_in_their_own_profiles():
    """A CPU host's `--profile cpu up --build` must not build the CUDA image."""
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert all(len(d.get("device_ids", [])) == 1 for d in devices), "one GPU per worker"
    assert SERVICES["worker"]["profiles"] == ["gpu"]
    cpu = SERVICES["worker-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert cpu["environment"]["CUDA_VISIBLE_DEVICES"] == "-1"
    assert SERVICES["worker"]["build"]["args"]["EXTRAS"] == "gpu"


@pytest.mark.parametrize("service", ["redis", "postgres", *RUNNING])
def test_healthchecks(service):
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1


def test_flower_published_with_basic_auth():
    settings = settings_for("flower")
    assert settings.flower_port == 5555
    assert settings.flower_basic_auth == DOTENV["FLOWER_BASIC_AUTH"]
    check_flower_settings(settings)
    published = [interpolate(p, DOTENV) for p in SERVICES["flower"]["ports"]]
    assert published == ["127.0.0.1:5555:5555"]


def test_redis_password_stays_off_the_command_line():
    command = " ".join(SERVICES["redis"]["command"])
    assert "requirepass" in command and "redis-server -" in command
    assert DOTENV["REDIS_PASSWORD"] not in interpolate(command, DOTENV)


def test_dockerfile_installs_the_project_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.split(None, 1) for line in text.splitlines() if line[:1].isalpha()
    ]
    keywords = [parts[0] for parts in instructions]
    args = {parts[0]: parts[1] for parts in instructions if len(parts) == 2}
    assert args["FROM"].startswith("python:3.11-slim")
    assert re.search(r'pip install --no-deps "\.', text), "installs the project itself"
    assert text.index("COPY pyproject.toml") < text.index("pip install -r") < text.index(
        "COPY worker"), "dependencies in a layer of their own, before the code"
    for package in ("worker", "trainer", "db"):
        assert re.search(rf"^COPY {package} \./{package}$", text, re.M)
    users = [parts[1].strip() for parts in instructions if parts[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    assert args["ENTRYPOINT"] == '["cxr"]'


def test_dockerignore_keeps_secrets_and_data_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".venv", "var", ".git"} <= ignored


def documented_commands() -> list[list[str]]:
    """`cxr ...` and `docker compose run --rm cli ...` lines in docs/deployment.md code blocks."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = line.split("#", 1)[0].split()
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words.pop(0)
            if words[:1] == ["cxr"]:
                commands.append(words[1:])
            elif words[:5] == ["docker", "compose", "run", "--rm", "cli"]:
                commands.append(words[5:])
    return commands


def test_documented_commands_parse():
    commands = documented_commands()
    assert len(commands) >= 8
    for command in commands:
        try:
            build_parser().parse_args(command)
        except SystemExit:
            pytest.fail(f"docs/deployment.md: `cxr {' '.join(command)}` does not parse")
