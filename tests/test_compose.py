"""The Docker deployment: docker-compose.yml, Dockerfile, .dockerignore, .env.example, deploy/.

No Docker engine is needed: the compose file is checked as YAML (services,
health checks, volumes, what is published where, limits, restart policies, the
GPU profile, no literal credentials) and, where a ``docker compose`` or
``docker-compose`` binary is installed, with its ``config -q`` against
``.env.example``. Without one, the same variables are substituted here the way
Compose does it and the result is checked again. The shell scripts the worker
and MLflow containers run are run here too, with stand-ins for ``python`` and
``mlflow`` that print their arguments, so the argv a container would start with
is checked (and parsed by the real command line).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
UI_PORTS = {"mlflow": "127.0.0.1:5000:5000", "dashboard": "127.0.0.1:8080:8080"}
VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$")
WORKERS = ("worker", "worker-gpu")


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    """``.env.example`` as a dict (KEY=VALUE lines; comments and blanks skipped)."""
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def strings(node: Any) -> Iterator[str]:
    """Every string (keys and values) in a parsed YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def as_text(command: Any) -> str:
    return " ".join(map(str, command)) if isinstance(command, list) else str(command)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ``${V}``, ``${V:-default}``, ``${V-default}``, ``${V:?err}``, ``$$``."""
    def sub(match: re.Match[str]) -> str:
        name, op, arg = match.group("name", "op", "arg")
        value = env.get(name)
        if op in (":-", "-"):
            return arg if (value is None or (op == ":-" and value == "")) else value
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise AssertionError(f"required variable {name} is not set: {arg}")
        assert value is not None, f"variable {name} is not in .env.example and has no default"
        return value

    return VAR.sub(sub, text.replace("$$", "\0")).replace("\0", "$")


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    """:func:`interpolate` applied to every string value of a parsed file, as Compose does (after parsing)."""
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    return interpolate(node, env) if isinstance(node, str) else node


# --------------------------------------------------------------------------- structure


def check_structure(doc: dict[str, Any], *, interpolated: bool) -> None:
    """The deployment's properties; on the raw file or on Compose's interpolated output."""
    services = doc["services"]
    assert set(services) == {"postgres", "mlflow", "dashboard", "worker", "worker-gpu"}

    # Only the two UIs are published, and only on the host's loopback.
    for name, service in services.items():
        ports = [_port(p) for p in service.get("ports") or []]
        if name in UI_PORTS:
            assert ports == [UI_PORTS[name]], (name, ports)
        else:
            assert ports == [], f"{name} must publish no port: {ports}"
        assert service.get("network_mode") != "host", name
        assert "container_name" not in service, f"{name}: container_name prevents --scale"

    postgres = services["postgres"]
    assert str(postgres["image"]).startswith("postgres:")
    assert "pg_isready" in as_text(postgres["healthcheck"]["test"])
    data_mounts = [v for v in postgres["volumes"] if _target(v) == "/var/lib/postgresql/data"]
    assert len(data_mounts) == 1 and _source(data_mounts[0]) in doc["volumes"], "postgres data on a named volume"
    init = [v for v in postgres["volumes"] if _target(v) == "/docker-entrypoint-initdb.d"]
    assert len(init) == 1
    init_dir = REPO / _source(init[0])  # relative to the project, or absolute once interpolated
    sql = " ".join(p.read_text() for p in sorted(init_dir.iterdir()) if p.suffix in (".sql", ".sh")).lower()
    assert "create database mlflow" in sql and "create database optuna" in sql

    mlflow = services["mlflow"]
    mlflow_cmd = as_text(mlflow["command"])
    for flag in ("mlflow server", "--artifacts-destination /mlartifacts", "--serve-artifacts", "--workers 1",
                 "--host 0.0.0.0", "--port 5000", "--app-name basic-auth"):
        assert flag in mlflow_cmd, flag
    mlflow_env = env_of(mlflow)
    assert re.fullmatch(r"postgresql(\+psycopg2)?://[^@]+@postgres:5432/mlflow", mlflow_env["MLFLOW_BACKEND_STORE_URI"])
    assert mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "mlflow:5000" in mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"]
    assert "MLFLOW_BASIC_AUTH" in mlflow_env and "MLFLOW_BASIC_AUTH" in mlflow_cmd
    if not interpolated:  # basic auth unless .env says false; the admin's password only from .env
        assert mlflow_env["MLFLOW_BASIC_AUTH"] == "${MLFLOW_BASIC_AUTH:-true}"
        assert mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
        assert mlflow_env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_SECRET_KEY:?")
    artifacts = [v for v in mlflow["volumes"] if _target(v) == "/mlartifacts"]
    assert len(artifacts) == 1 and _source(artifacts[0]) in doc["volumes"], "artifacts on a named volume"
    assert "/health" in as_text(mlflow["healthcheck"]["test"])
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"

    dashboard = services["dashboard"]
    dashboard_cmd = as_text(dashboard["command"])
    assert "--storage" not in dashboard_cmd and "@" not in dashboard_cmd, "no store URL (with its password) in the argv"
    assert re.fullmatch(r"postgresql(\+psycopg2)?://[^@]+@postgres:5432/optuna", env_of(dashboard)["EMNIST_HPO_STORAGE"])
    assert "--host 0.0.0.0" in dashboard_cmd and "--port 8080" in dashboard_cmd
    assert "healthcheck" in dashboard

    for name in WORKERS:
        worker = services[name]
        assert worker.get("build") is not None or worker.get("image") == mlflow.get("image")
        cmd = as_text(worker["command"]).replace("$$", "$")  # Compose's output escapes $ again
        assert re.search(r"exec python -m emnist_hpo study --split \"\$\{SPLIT\}\" --trials \"\$\{TRIALS\}\"", cmd)
        assert "--storage" not in cmd and "@" not in cmd, "no store URL (with its password) in the argv"
        env = env_of(worker)
        assert re.fullmatch(r"postgresql\+psycopg2://[^@ ]+@postgres:5432/optuna", env["EMNIST_HPO_STORAGE"])
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        for var in ("SPLIT", "STUDY_NAME", "TRIALS", "EPOCHS", "MAX_PARAMS", "TIMEOUT", "STUDY_ARGS"):
            assert var in env and f"${{{var}" in cmd, var
        if not interpolated:
            assert env["SPLIT"] == "${SPLIT:-letters}" and env["STUDY_NAME"] == "${STUDY_NAME:-}"
            assert env["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
        assert "expose" not in worker
        assert {k: v["condition"] for k, v in worker["depends_on"].items()} == {
            "postgres": "service_healthy", "mlflow": "service_healthy", "dashboard": "service_healthy"}
        data = [v for v in worker["volumes"] if _target(v) == env["EMNIST_DATA_DIR"]]
        assert len(data) == 1 and _read_only(data[0]), "EMNIST data mounted read-only at $EMNIST_DATA_DIR"
        if not interpolated:
            assert _source(data[0]).startswith("${EMNIST_DATA_DIR")
            assert worker["cpus"] == "${WORKER_CPUS:-2}" and worker["mem_limit"] == "${WORKER_MEMORY:-4g}"
        else:
            assert float(worker["cpus"]) > 0 and re.fullmatch(r"\d+[kmg]?", str(worker["mem_limit"]).lower())
        # a crashed worker restarts (and resumes the study), a finished one (exit 0) does not
        assert re.fullmatch(r"on-failure(:\d+)?", str(worker["restart"]))
    for name in ("postgres", "mlflow", "dashboard"):
        assert services[name]["restart"] == "unless-stopped", name

    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in services["worker"]
    assert gpu["build"]["target"] == "gpu" and gpu["image"] != services["worker"]["image"]
    assert env_of(gpu)["KERAS_BACKEND"] == "jax" and "KERAS_BACKEND" not in env_of(services["worker"])
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert as_text(gpu["command"]) == as_text(services["worker"]["command"])


def _port(port: Any) -> str:
    """A published port as ``HOST_IP:PUBLISHED:TARGET`` (short syntax, or Compose v2's long form)."""
    if isinstance(port, dict):
        host_ip = port.get("host_ip")
        return f"{host_ip}:{port.get('published')}:{port.get('target')}" if host_ip else f"{port.get('published')}:{port.get('target')}"
    return str(port).removesuffix("/tcp")


def _target(volume: Any) -> str:
    if isinstance(volume, dict):
        return str(volume["target"])
    return str(volume)[len(_source(volume)) + 1:].split(":")[0]


def _source(volume: Any) -> str:
    if isinstance(volume, dict):
        return str(volume.get("source"))
    match = re.match(r"(\$\{[^}]*\}|[^:]+):", str(volume))
    return match.group(1) if match else str(volume)


def _read_only(volume: Any) -> bool:
    if isinstance(volume, dict):
        return bool(volume.get("read_only"))
    return str(volume).rsplit(":", 1)[-1].split(",")[0] == "ro"


def test_compose_file_structure() -> None:
    check_structure(load_compose(), interpolated=False)


def test_no_literal_credentials() -> None:
    """Every credential is a ${VARIABLE} from .env; .env is git-ignored, .env.example has placeholders."""
    doc = load_compose()
    for text in strings(doc):
        for match in re.finditer(r"://([^/@\s:]+):([^@\s]+)@", text):
            user, password = match.groups()
            assert VAR.fullmatch(user) and VAR.fullmatch(password), f"literal credentials in {text!r}"
    for name, service in doc["services"].items():
        for key, value in env_of(service).items():
            if SECRET_KEY.search(key):
                assert VAR.fullmatch(value), f"{name}.{key} must come from .env, not {value!r}"
    for ini in (REPO / "deploy").rglob("*.ini"):
        assert not re.search(r"^\s*admin_password\s*=", ini.read_text(), re.M), ini

    example = env_example()
    for key, value in example.items():
        if SECRET_KEY.search(key):
            assert "change-me" in value, f".env.example {key} must be a placeholder"
    referenced = {m.group("name") for m in VAR.finditer(COMPOSE.read_text().replace("$$", ""))}  # not the shell's
    assert referenced <= set(example), f"not documented in .env.example: {sorted(referenced - set(example))}"
    assert "/.env" in (REPO / ".gitignore").read_text().split()
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".env", ".git", ".venv", "mlruns"):
        assert entry in ignored, f".dockerignore must exclude {entry}"


def test_dockerfile() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim AS cpu\b", text, re.M)
    assert re.search(r"pip install[^\n]* \.(\s|$)", text) and "psycopg2-binary" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0"), "the image runs as a non-root user"
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?", text, re.M)
    assert ("cpu", "gpu") in stages, "a gpu stage on top of the cpu one (compose's worker-gpu builds it)"
    assert stages[-1] == ("cpu", ""), "a build without --target gives the CPU image"
    gpu = text[text.index("AS gpu"):]
    assert "jax[cuda12]" in gpu and "KERAS_BACKEND=jax" in gpu


def compose_command() -> list[str] | None:
    """``docker compose`` (v2) or ``docker-compose`` (v1) if one runs here; else None."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            if subprocess.run([*cmd, "version"], capture_output=True, timeout=60).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def test_compose_config_with_env_example(tmp_path: Path) -> None:
    """``config -q`` accepts the file with .env.example; the interpolated file keeps every property.

    With no Compose binary, the substitution is done here (never skipped).
    """
    cmd = compose_command()
    if cmd is not None:
        base = [*cmd, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "--project-directory", str(REPO)]
        quiet = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, timeout=120)
        assert quiet.returncode == 0, quiet.stderr
        rendered = subprocess.run([*base, "config"], capture_output=True, text=True, timeout=120)
        assert rendered.returncode == 0, rendered.stderr
        doc = yaml.safe_load(rendered.stdout)
    else:
        doc = interpolate_tree(load_compose(), env_example())
    check_structure(doc, interpolated=True)
    example = env_example()
    assert example["POSTGRES_PASSWORD"] in env_of(doc["services"]["mlflow"])["MLFLOW_BACKEND_STORE_URI"]
    assert env_of(doc["services"]["worker"])["SPLIT"] == example["SPLIT"]
    assert env_of(doc["services"]["mlflow"])["MLFLOW_BASIC_AUTH"] == example["MLFLOW_BASIC_AUTH"] == "true"


def test_compose_config_without_env_names_the_missing_credentials(tmp_path: Path) -> None:
    """Without .env, Compose refuses the file and says which credential to set (there are no built-in ones)."""
    cmd = compose_command()
    empty = tmp_path / "empty.env"
    empty.write_text("")
    if cmd is not None:
        env = {k: v for k, v in os.environ.items() if not re.match(r"POSTGRES_|MLFLOW_|EMNIST_DATA_DIR", k)}
        out = subprocess.run([*cmd, "--env-file", str(empty), "-f", str(COMPOSE), "--project-directory",
                              str(REPO), "config", "-q"], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode != 0
        assert re.search(r"set (POSTGRES_USER|POSTGRES_PASSWORD|MLFLOW_ADMIN_PASSWORD|MLFLOW_SECRET_KEY|"
                         r"EMNIST_DATA_DIR) in \.env", out.stderr), out.stderr
    text = COMPOSE.read_text()
    for var in ("POSTGRES_USER", "POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY", "EMNIST_DATA_DIR"):
        assert f"${{{var}:?set {var} in .env}}" in text, f"{var} must be required (no built-in value)"


# --------------------------------------------------------------------------- what the containers run


def _stand_in(tmp_path: Path, name: str) -> Path:
    """A ``name`` executable that prints its arguments, one per line, in a folder put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    exe.chmod(0o755)
    return bin_dir


def _run_script(service: dict[str, Any], bin_dir: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    """Run a service's ``sh -c`` script with its (interpolated) environment, as its container would."""
    command = service["command"]
    assert command[:2] == ["sh", "-c"], command
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env_of(service), **overrides}
    return subprocess.run(["sh", "-c", command[2]], env=env, capture_output=True, text=True, timeout=30)


def _settings(**values: str) -> dict[str, str]:
    settings = env_example()
    settings.update(values)
    return settings


def _worker_argv(tmp_path: Path, **values: str) -> list[str]:
    doc = interpolate_tree(load_compose(), _settings(**values))
    out = _run_script(doc["services"]["worker"], _stand_in(tmp_path, "python"))
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_worker_study_follows_split_and_takes_its_arguments_from_env(tmp_path: Path) -> None:
    from emnist_hpo.cli import build_parser

    argv = _worker_argv(tmp_path, SPLIT="digits", STUDY_NAME="", TRIALS="30", EPOCHS="5", MAX_PARAMS="",
                        TIMEOUT="", STUDY_ARGS="")
    assert argv == ["-m", "emnist_hpo", "study", "--split", "digits", "--trials", "30", "--epochs", "5",
                    "--no-progress"]
    args = build_parser().parse_args(argv[2:])  # the real command line takes it
    assert args.study_name is None and args.split == "digits"  # so the study is emnist-digits, the CLI's default

    argv = _worker_argv(tmp_path, SPLIT="balanced", STUDY_NAME="balanced-small", MAX_PARAMS="232000",
                        TIMEOUT="3600", STUDY_ARGS="--sampler random --finalists 3")
    args = build_parser().parse_args(argv[2:])
    assert (args.split, args.study_name, args.max_params, args.timeout) == ("balanced", "balanced-small", 232000, 3600)
    assert (args.sampler, args.finalists, args.trials, args.epochs) == ("random", 3, 20, 10)
    assert not any("@" in a for a in argv)


def test_study_name_default_is_the_splits_study() -> None:
    from emnist_hpo.options import StudyOptions

    assert StudyOptions(split="digits").name == "emnist-digits"  # what a worker without STUDY_NAME joins


def test_mlflow_server_runs_with_basic_auth_unless_turned_off(tmp_path: Path) -> None:
    bin_dir = _stand_in(tmp_path, "mlflow")
    secrets = dict(MLFLOW_ADMIN_PASSWORD="a-real-password", MLFLOW_SECRET_KEY="a-real-long-key")
    settings = _settings(**secrets)
    settings.pop("MLFLOW_BASIC_AUTH")  # not set in .env: on
    on = _run_script(interpolate_tree(load_compose(), settings)["services"]["mlflow"], bin_dir)
    assert on.returncode == 0, on.stderr
    assert on.stdout.splitlines()[-2:] == ["--app-name", "basic-auth"]
    assert "--serve-artifacts" in on.stdout.splitlines()
    off = _run_script(interpolate_tree(load_compose(), _settings(MLFLOW_BASIC_AUTH="false", **secrets))
                      ["services"]["mlflow"], bin_dir)
    assert off.returncode == 0 and "basic-auth" not in off.stdout
    # the placeholder password of .env.example is refused: the server never starts with it
    refused = _run_script(interpolate_tree(load_compose(), _settings())["services"]["mlflow"], bin_dir)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "replace the change-me MLFLOW_ADMIN_PASSWORD" in refused.stderr


def test_interpolation_fallback_matches_compose_rules() -> None:
    """The fallback substitution (used where no Compose binary runs) follows Compose's rules."""
    env = {"A": "1", "EMPTY": ""}
    assert interpolate("${A}-${B:-x}-${EMPTY:-d}-${EMPTY-d}-$${A}", env) == "1-x-d--${A}"
    with pytest.raises(AssertionError, match="required"):
        interpolate("${MISSING:?set it}", env)
    with pytest.raises(AssertionError, match="not in .env.example"):
        interpolate("${MISSING}", env)
