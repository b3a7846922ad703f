"""Where the configuration comes from: the env files, read in istio-start.sh's order as `set -a; . FILE`.

`read_shell()` is the only code that reads env files: it checks who may have written them (they configure
a root process) and hands their text to envfile.evaluate, which assigns what bash would have assigned.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from istio_vm.config.envfile import evaluate
from istio_vm.config.model import Shell
from istio_vm.defaults import DEFAULT_CLUSTER_ENV, DEFAULT_RESOLV_CONF, DEFAULT_SIDECAR_ENV
from istio_vm.errors import Problem

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class Sources:
    """Where the configuration is read from (the CLI's flags, or their defaults)."""

    sidecar_env: str | None = None  # --sidecar-env
    cluster_env: str | None = None  # --cluster-env
    resolv_conf: str = DEFAULT_RESOLV_CONF


def read_shell(sources: Sources, environ: Mapping[str, str], euid: int,
               overrides: Mapping[str, tuple[str, str]] | None = None) -> Shell:
    """Read sidecar.env then cluster.env as `set -a; . FILE` would (the only env-file reads).

    `overrides` ({VARIABLE: (value, origin)}, e.g. istio-iptables flags) win over files and environment.
    """
    shell = dict(environ)
    origins = dict.fromkeys(environ, "environment")
    problems: list[Problem] = []
    files: list[str] = []
    for variable, flag, flag_name, default in (
        ("ISTIO_SIDECAR_CONFIG", sources.sidecar_env, "--sidecar-env", DEFAULT_SIDECAR_ENV),
        ("ISTIO_CLUSTER_CONFIG", sources.cluster_env, "--cluster-env", DEFAULT_CLUSTER_ENV),
    ):
        # `VAR=${VAR:-default}` under `set -a`: the path is exported, and sidecar.env may set the second.
        if flag is not None:
            path, origins[variable] = flag, flag_name
        elif shell.get(variable):
            path = shell[variable]
        else:
            path, origins[variable] = default, "default"
        shell[variable] = path
        text = _read_env_file(path, euid, problems)
        if text is None:
            continue
        files.append(path)
        assignments, file_problems = evaluate(text, path, shell)
        problems.extend(file_problems)
        origins.update((a.name, a.where) for a in assignments)
    for variable, (value, origin) in (overrides or {}).items():
        shell[variable], origins[variable] = value, origin
    return Shell(shell, origins, tuple(files), tuple(problems))


def _read_env_file(path: str, euid: int, problems: list[Problem]) -> str | None:
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        log.info("%s: not found, skipped", path)
        return None
    except OSError as e:
        problems.append(Problem(path, None, None, f"cannot read: {e.strerror}"))
        return None
    if euid == 0 and info.st_uid != 0:
        problems.append(Problem(path, None, None, f"owned by uid {info.st_uid}, not root: it configures a "
                                "root process; chown root it"))
    if euid == 0 and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(Problem(path, None, None, f"mode {stat.filemode(info.st_mode)} lets others write "
                                "it: it configures a root process; chmod go-w it"))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        problems.append(Problem(f"{path}:{line}", None, None, "not valid UTF-8"))
        return None
