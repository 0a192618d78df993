"""A real Airflow 3.3 deployment for tests: CeleryExecutor on PostgreSQL and Redis, one process per component.

``AirflowDeployment`` creates a fresh database and Redis namespace, a temporary ``AIRFLOW_HOME``, starts
api-server, scheduler, dag-processor, triggerer and a Celery worker as separate process groups, and talks to
them through the public REST API (``AirflowApi``). ``LocalEndpoint`` runs ``healthimaging-local serve`` as a
subprocess. Every process started here is stopped by ``stop()`` (SIGTERM to the process group, then SIGKILL).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
ADMIN_USER = "admin"
TERMINAL_RUN_STATES = frozenset({"success", "failed"})
TERMINAL_TI_STATES = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})


def tcp_reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds.

    :param host: host name or address
    :param port: TCP port
    :param timeout: seconds to wait for the connection
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the kernel just handed out as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.5, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    :param predicate: called repeatedly; exceptions count as "not yet"
    :param timeout: seconds before ``TimeoutError``
    :param interval: seconds between calls
    :param what: description used in the timeout message
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:
            last_error = error
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error!r})"
            )
        time.sleep(interval)


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a text file, or a note when it does not exist.

    :param path: the file
    :param lines: how many lines to return
    """
    if not path.exists():
        return f"<{path} does not exist>"
    with path.open("rb") as stream:
        stream.seek(0, os.SEEK_END)
        size = stream.tell()
        stream.seek(max(0, size - 200_000))
        text = stream.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def process_tree(pid: int) -> list[psutil.Process]:
    """The process with ``pid`` and all its descendants that are still alive.

    :param pid: root process id
    """
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def living(pids: Iterable[int]) -> list[int]:
    """The pids among ``pids`` whose process still runs (zombies, which only wait to be reaped, excluded).

    :param pids: process ids
    """
    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
    return alive


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a process group, ignoring a group that is already gone.

    :param pgid: process group id (the pid of the group leader we started)
    :param sig: the signal
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[psutil.Process]:
    """Every live process whose process group is ``pgid`` (children that were re-parented included).

    :param pgid: process group id
    """
    members = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members


def stop_group(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its process group.

    SIGTERM to the group, wait up to ``grace`` seconds, then SIGKILL whatever is left.

    :param process: the group leader
    :param grace: seconds to wait after SIGTERM
    """
    pgid = process.pid
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        process.poll()
        if process.returncode is not None and not group_members(pgid):
            break
        time.sleep(0.2)
    signal_group(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@dataclass
class Component:
    """One long-running process (group) of the deployment.

    :param name: short name, also the log file stem
    :param argv: command line
    :param env: environment
    :param log_dir: where stdout+stderr go (``<name>.log``, appended across restarts)
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> None:
        """Start the process in a new session (its own process group)."""
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.log_dir,
            )

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pids(self) -> list[int]:
        """Pids of the group leader and every live descendant."""
        return [proc.pid for proc in process_tree(self.pid)] if self.alive() else []

    def kill(self) -> None:
        """SIGKILL the whole process group, as a machine loss would, and reap the leader."""
        if self.process is None:
            return
        signal_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        wait_until(lambda: not group_members(self.pid), timeout=10, what=f"{self.name} group to die")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        if self.process is not None:
            stop_group(self.process)

    def restart(self) -> None:
        """Stop (if still running) and start again with the same command line and environment."""
        self.stop()
        self.start()


@dataclass
class ResourceUsage:
    """CPU seconds (user+system) and peak resident memory of a process tree over a sampling window."""

    cpu_seconds: float
    peak_rss_bytes: int
    samples: int
    pids_seen: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu_seconds": round(self.cpu_seconds, 3),
            "peak_rss_mib": round(self.peak_rss_bytes / 2**20, 1),
            "samples": self.samples,
            "pids_seen": self.pids_seen,
        }


class ResourceSampler:
    """Samples ``cpu_times`` and ``memory_info().rss`` of a component's process tree in a thread.

    CPU is the growth of user+system time per pid between the first and the last sample that saw it
    (processes born during the window count from zero); peak RSS is the maximum summed RSS of one sample.

    :param component: the component to watch
    :param interval: seconds between samples
    """

    def __init__(self, component: Component, interval: float = 0.25) -> None:
        self.component = component
        self.interval = interval
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._peak_rss = 0
        self._samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{component.name}", daemon=True)

    def _sample(self, initial: bool) -> None:
        rss = 0
        for proc in process_tree(self.component.pid):
            try:
                times = proc.cpu_times()
                mem = proc.memory_info().rss
            except psutil.Error:
                continue
            cpu = times.user + times.system
            self._first.setdefault(proc.pid, cpu if initial else 0.0)
            self._last[proc.pid] = cpu
            rss += mem
        self._peak_rss = max(self._peak_rss, rss)
        self._samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample(initial=False)

    def __enter__(self) -> ResourceSampler:
        self._sample(initial=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(initial=False)

    @property
    def usage(self) -> ResourceUsage:
        cpu = sum(self._last[pid] - self._first.get(pid, 0.0) for pid in self._last)
        return ResourceUsage(cpu, self._peak_rss, self._samples, len(self._last))


class AirflowApi:
    """The part of the Airflow REST API (``/api/v2``) the tests use, authenticated with a JWT.

    :param base_url: ``http://127.0.0.1:PORT``
    :param username: SimpleAuthManager user
    :param password: its password
    """

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url
        self._username = username
        self._password = password
        self._client = httpx.Client(base_url=base_url, timeout=30.0)
        self._token: str | None = None

    def close(self) -> None:
        self._client.close()

    def token(self) -> str:
        """Get a JWT from ``POST /auth/token`` (SimpleAuthManager)."""
        response = self._client.post(
            "/auth/token", json={"username": self._username, "password": self._password}
        )
        response.raise_for_status()
        return str(response.json()["access_token"])

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send an authenticated request; fetches a token on first use and again after a 401."""
        if self._token is None:
            self._token = self.token()
        extra_headers = kwargs.pop("headers", None) or {}
        for attempt in range(2):
            headers = {**extra_headers, "Authorization": f"Bearer {self._token}"}
            response = self._client.request(method, path, headers=headers, **kwargs)
            if response.status_code == 401 and attempt == 0:
                self._token = self.token()
                continue
            return response
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Like ``request`` but raise on an error status and decode the body."""
        response = self.request(method, path, **kwargs)
        if response.is_error:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json() if response.content else None

    # --- DAGs and runs ---------------------------------------------------------------------------------

    def dag(self, dag_id: str) -> dict[str, Any]:
        return dict(self.json("GET", f"/api/v2/dags/{dag_id}"))

    def import_errors(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/api/v2/importErrors")["import_errors"])

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until the dag-processor has parsed ``dag_id``; fail early on an import error for it."""

        def parsed() -> dict[str, Any] | None:
            response = self.request("GET", f"/api/v2/dags/{dag_id}")
            if response.status_code == 200:
                return dict(response.json())
            errors = [e for e in self.import_errors() if dag_id.split(".")[0] in json.dumps(e)]
            if errors:
                raise AssertionError(f"import errors for {dag_id}: {errors}")
            return None

        deadline = time.monotonic() + timeout
        while True:
            try:
                dag = parsed()
            except AssertionError:
                raise
            except Exception:
                dag = None
            if dag:
                return dag
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"DAG {dag_id} not parsed after {timeout}s; import errors: {self.import_errors()}"
                )
            time.sleep(1.0)

    def unpause(self, dag_id: str) -> None:
        self.json("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})

    def trigger_run(
        self, dag_id: str, conf: Mapping[str, Any] | None = None, run_id: str | None = None
    ) -> httpx.Response:
        """``POST /api/v2/dags/{dag_id}/dagRuns``; returns the raw response so callers can assert on 4xx."""
        body = {
            "dag_run_id": run_id or f"test_{uuid.uuid4().hex[:12]}",
            "logical_date": None,
            "conf": dict(conf or {}),
        }
        return self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None, run_id: str | None = None) -> str:
        """Trigger a run and return its run id (raises on a 4xx/5xx)."""
        response = self.trigger_run(dag_id, conf, run_id)
        if response.is_error:
            raise RuntimeError(f"trigger {dag_id} -> {response.status_code}: {response.text}")
        return str(response.json()["dag_run_id"])

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return dict(self.json("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"))

    def dag_runs(self, dag_id: str, **params: Any) -> list[dict[str, Any]]:
        return list(
            self.json("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 100, **params})["dag_runs"]
        )

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300.0) -> dict[str, Any]:
        """Poll until the run is ``success`` or ``failed`` and return it."""
        return dict(
            wait_until(
                lambda: (run := self.dag_run(dag_id, run_id))["state"] in TERMINAL_RUN_STATES and run,
                timeout=timeout,
                interval=1.0,
                what=f"run {run_id} of {dag_id} to finish",
            )
        )

    def clear_task_instances(
        self, dag_id: str, run_id: str, task_ids: list[str], include_downstream: bool = True
    ) -> list[dict[str, Any]]:
        """Clear tasks of one run (every map index), as the UI's Clear does; returns the cleared instances.

        :param dag_id: the DAG
        :param run_id: the run
        :param task_ids: the tasks to clear (mapped ones at every map index)
        :param include_downstream: also clear what depends on them
        """
        body = {
            "dry_run": False,
            "dag_run_id": run_id,
            "task_ids": task_ids,
            "include_downstream": include_downstream,
            "only_failed": False,
            "reset_dag_runs": True,
        }
        return list(
            self.json("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances", json=body)["task_instances"]
        )

    def clear_run(self, dag_id: str, run_id: str, only_failed: bool = False) -> None:
        """Clear a whole run (``POST .../dagRuns/{run_id}/clear``), as the UI's Clear on a run does.

        :param dag_id: the DAG
        :param run_id: the run
        :param only_failed: clear only the failed (and upstream-failed) tasks
        """
        self.json(
            "POST",
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/clear",
            json={"dry_run": False, "only_failed": only_failed},
        )

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of the run, mapped ones included (one entry per map index)."""
        # Pages of 100: the API server caps ``limit`` at ``[api] maximum_page_limit`` (100) without saying so.
        found: list[dict[str, Any]] = []
        while True:
            page = self.json(
                "GET",
                f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                params={"limit": 100, "offset": len(found), "order_by": "id"},
            )
            found.extend(page["task_instances"])
            if not page["task_instances"] or len(found) >= page["total_entries"]:
                return found

    def ti_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """``{task_id: state}`` (``task_id[map_index]`` for mapped instances)."""
        states: dict[str, str | None] = {}
        for ti in self.task_instances(dag_id, run_id):
            key = ti["task_id"] if ti["map_index"] == -1 else f"{ti['task_id']}[{ti['map_index']}]"
            states[key] = ti["state"]
        return states

    def task_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        if map_index >= 0:
            path += f"/{map_index}"
        return dict(self.json("GET", path))

    def xcom(
        self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1
    ) -> Any:
        """The deserialized value of one XCom entry (``KeyError`` when it does not exist)."""
        response = self.request(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
            params={"map_index": map_index, "deserialize": True},
        )
        if response.status_code == 404:
            raise KeyError(f"{task_id}[{map_index}] has no XCom {key!r}")
        if response.is_error:
            raise RuntimeError(f"xcom {task_id}/{key} -> {response.status_code}: {response.text}")
        return response.json()["value"]

    def xcom_keys(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[str]:
        body = self.json(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries",
            params={"map_index": map_index, "limit": 100},
        )
        return [entry["key"] for entry in body["xcom_entries"]]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """The task log of one try as plain text (structured log lines joined)."""
        response = self.request(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"map_index": map_index, "full_content": True},
            headers={"Accept": "application/json"},
        )
        response.raise_for_status()
        content = response.json().get("content", [])
        if isinstance(content, str):
            return content
        lines = []
        for entry in content:
            if isinstance(entry, dict):
                extra = {k: v for k, v in entry.items() if k not in {"event", "timestamp", "level", "logger"}}
                lines.append(f"{entry.get('level', '')} {entry.get('event', '')} {extra if extra else ''}")
            else:
                lines.append(str(entry))
        return "\n".join(lines)

    # --- assets --------------------------------------------------------------------------------------------

    def asset_events(self, **filters: Any) -> list[dict[str, Any]]:
        """``GET /api/v2/assets/events`` (filters such as ``source_dag_id``, ``source_run_id``), oldest first."""
        params = {"limit": 100, "order_by": "timestamp", **filters}
        return list(self.json("GET", "/api/v2/assets/events", params=params)["asset_events"])

    def consumed_asset_events(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """The asset events a run was created for (the run page's "Source Asset Events")."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/upstreamAssetEvents"
        return list(self.json("GET", path)["asset_events"])

    # --- variables and connections ---------------------------------------------------------------------

    def set_variable(self, key: str, value: str) -> None:
        response = self.request("PATCH", f"/api/v2/variables/{key}", json={"key": key, "value": value})
        if response.status_code == 404:
            self.json("POST", "/api/v2/variables", json={"key": key, "value": value})
        elif response.is_error:
            raise RuntimeError(f"variable {key} -> {response.status_code}: {response.text}")

    def delete_variable(self, key: str) -> None:
        self.request("DELETE", f"/api/v2/variables/{key}")

    def set_connection(self, conn_id: str, conn_type: str, **fields: Any) -> None:
        """Create or replace a connection (``extra`` may be a dict)."""
        body: dict[str, Any] = {"connection_id": conn_id, "conn_type": conn_type, **fields}
        if isinstance(body.get("extra"), dict):
            body["extra"] = json.dumps(body["extra"])
        self.request("DELETE", f"/api/v2/connections/{conn_id}")
        self.json("POST", "/api/v2/connections", json=body)

    def health(self) -> dict[str, Any]:
        return dict(self._client.get("/api/v2/monitor/health").json())


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


@dataclass
class DeploymentSettings:
    """What a deployment runs: which DAGs, extra env for every component, worker concurrency.

    :param dags_folder: folder with the DAG files
    :param extra_env: added to every Airflow component's environment (e.g. ``AIRFLOW_VAR_*``)
    :param worker_concurrency: Celery worker slots
    """

    dags_folder: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    worker_concurrency: int = 4


class AirflowDeployment:
    """A running Airflow: fresh PostgreSQL database, Redis namespace, AIRFLOW_HOME and five components.

    Use ``start()``/``stop()`` (or a context manager). ``components`` maps ``api-server``, ``scheduler``,
    ``dag-processor``, ``triggerer`` and ``worker`` to ``Component`` objects.

    :param settings: what to run
    :param base_dir: temporary directory for AIRFLOW_HOME and logs (created when None)
    """

    COMPONENT_NAMES = ("api-server", "scheduler", "dag-processor", "triggerer", "worker")

    def __init__(self, settings: DeploymentSettings, base_dir: Path | None = None) -> None:
        self.settings = settings
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="airflow_deploy_"))
        self.home = self.base_dir / "airflow_home"
        self.log_dir = self.base_dir / "logs"
        self.database = f"airflow_test_{secrets.token_hex(4)}"
        self.redis_db, self.redis_prefix = self._pick_redis_namespace()
        self.api_port = free_port()
        self.password = secrets.token_urlsafe(12)
        self.components: dict[str, Component] = {}
        self.api: AirflowApi | None = None
        self._database_created = False
        atexit.register(self.stop)  # a last resort if the test session dies without teardown

    # --- environment -----------------------------------------------------------------------------------

    @staticmethod
    def _pick_redis_namespace() -> tuple[int, str]:
        """A Redis db number (1-15, preferring an empty one) plus a unique key prefix inside it."""
        import redis

        candidates = list(range(1, 16))
        secrets.SystemRandom().shuffle(candidates)
        chosen = candidates[0]
        for number in candidates:
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
            empty = client.dbsize() == 0
            client.close()
            if empty:
                chosen = number
                break
        return chosen, f"airflow_test_{secrets.token_hex(4)}:"

    @property
    def sql_alchemy_conn(self) -> str:
        return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.database}"

    def environment(self) -> dict[str, str]:
        """The environment shared by every Airflow component and CLI call."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env = {
            **base,
            "PATH": f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.settings.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__FERNET_KEY": self._fernet,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.api_port}/execution/",
            "AIRFLOW__CORE__PARALLELISM": "64",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "64",
            "AIRFLOW__CORE__MAX_ACTIVE_RUNS_PER_DAG": "32",
            "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "5",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": self._jwt_secret,
            "AIRFLOW__API__SECRET_KEY": self._jwt_secret,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
            "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.database}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.settings.worker_concurrency),
            "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": self.redis_prefix,
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.log_dir / "tasks"),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # Fast loops: the suite must fit in CI; a 2-core machine copes with these.
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
            "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "3",
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__PARSING_CLEANUP_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "600",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "8",
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "2",
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": f"q_{self.redis_prefix.rstrip(':')}",
        }
        env.update(self.settings.extra_env)
        return env

    def airflow_cli(
        self, *args: str, timeout: float = 300.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``airflow <args>`` with the deployment's environment (output captured).

        :param args: CLI arguments
        :param timeout: seconds
        :param check: raise on a non-zero exit status
        """
        result = subprocess.run(
            [str(VENV_BIN / "airflow"), *args],
            env=self._env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base_dir,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"airflow {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result

    # --- lifecycle -------------------------------------------------------------------------------------

    def _create_database(self) -> None:
        import psycopg2

        connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{self.database}"')
        connection.close()
        self._database_created = True

    def _drop_database(self) -> None:
        if not self._database_created:
            return
        import psycopg2

        connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        connection.close()
        self._database_created = False

    def _clear_redis(self) -> None:
        import redis

        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=self.redis_db)
        keys = list(client.scan_iter(match=f"{self.redis_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()

    def start(self) -> AirflowDeployment:
        """Create the database, migrate it, start all components and wait until they are healthy."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._fernet = _fernet_key()
        self._jwt_secret = secrets.token_urlsafe(32)
        (self.home / "passwords.json").write_text(json.dumps({ADMIN_USER: self.password}))
        self._env = self.environment()
        self._create_database()
        migrate = self.airflow_cli("db", "migrate", timeout=600, check=False)
        (self.log_dir / "db-migrate.log").write_text(migrate.stdout + migrate.stderr)
        if migrate.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{tail(self.log_dir / 'db-migrate.log')}")
        airflow = str(VENV_BIN / "airflow")
        argv = {
            "api-server": [
                airflow,
                "api-server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
                "-w",
                "1",
            ],
            "scheduler": [airflow, "scheduler"],
            "dag-processor": [airflow, "dag-processor"],
            "triggerer": [airflow, "triggerer"],
            "worker": [
                airflow,
                "celery",
                "worker",
                "--concurrency",
                str(self.settings.worker_concurrency),
                "--celery-hostname",
                f"worker_{self.redis_prefix.rstrip(':')}@%h",
                "--queues",
                self._env["AIRFLOW__OPERATORS__DEFAULT_QUEUE"],
                "--without-gossip",
                "--without-mingle",
            ],
        }
        for name in self.COMPONENT_NAMES:
            component = Component(name, argv[name], self._env, self.log_dir)
            self.components[name] = component
            component.start()
        self.api = AirflowApi(f"http://127.0.0.1:{self.api_port}", ADMIN_USER, self.password)
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 180.0) -> None:
        """Wait until the api-server answers and scheduler, dag-processor and triggerer heartbeat."""
        assert self.api is not None

        def healthy() -> bool:
            self.check_alive()
            health = self.api.health() if self.api else {}
            wanted = ("metadatabase", "scheduler", "triggerer", "dag_processor")
            return all(health.get(part, {}).get("status") == "healthy" for part in wanted)

        wait_until(healthy, timeout=timeout, interval=1.0, what="Airflow components to be healthy")
        wait_until(self.api.token, timeout=30, what="a JWT from /auth/token")

    def check_alive(self) -> None:
        """Raise with the log tail of any component that exited."""
        for component in self.components.values():
            if component.process is not None and component.process.poll() is not None:
                raise RuntimeError(
                    f"{component.name} exited with {component.process.returncode}:\n{tail(component.log_path)}"
                )

    def stop(self) -> None:
        """Stop every component, drop the database, clear the Redis keys. Safe to call twice."""
        if self.api is not None:
            self.api.close()
            self.api = None
        for component in reversed(list(self.components.values())):
            with contextlib.suppress(Exception):
                component.stop()
        with contextlib.suppress(Exception):
            self._drop_database()
        with contextlib.suppress(Exception):
            self._clear_redis()

    def __enter__(self) -> AirflowDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- fault injection and observation --------------------------------------------------------------

    def component(self, name: str) -> Component:
        return self.components[name]

    def pids(self, name: str) -> list[int]:
        """Pids of a component's process tree."""
        return self.components[name].pids()

    def kill(self, name: str) -> None:
        """SIGKILL a component's whole process group."""
        self.components[name].kill()

    def restart(self, name: str) -> None:
        """Start a component again (after ``kill``) with the same command line and environment."""
        self.components[name].restart()

    def sample(self, name: str, interval: float = 0.25) -> ResourceSampler:
        """A ``ResourceSampler`` for a component (use as a context manager)."""
        return ResourceSampler(self.components[name], interval)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """The rows of one SQL query on the deployment's metadata database (for checks the REST API cannot make).

        :param sql: the query, with ``%s`` placeholders
        :param params: their values
        """
        import psycopg2

        connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=self.database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return list(cursor.fetchall())
        finally:
            connection.close()

    def log_tails(self, lines: int = 40, names: Iterable[str] | None = None) -> str:
        """The tails of the component logs, for failure reports."""
        chosen = list(names) if names is not None else [*self.components, "db-migrate"]
        parts = []
        for name in chosen:
            parts.append(f"----- {name} ({self.log_dir / (name + '.log')}) -----")
            parts.append(tail(self.log_dir / f"{name}.log", lines))
        return "\n".join(parts)


class LocalEndpoint:
    """``healthimaging-local serve`` as a subprocess, restartable on the same state directory.

    :param state_dir: the endpoint's state directory (kept across restarts)
    :param log_dir: where ``endpoint-<n>.log`` goes
    :param options: extra CLI options, e.g. ``["--import-seconds", "5"]``
    """

    def __init__(self, state_dir: Path, log_dir: Path, options: Iterable[str] = ()) -> None:
        self.state_dir = state_dir
        self.options = list(options)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.name = f"endpoint-{state_dir.name}"
        self.component = Component(self.name, [], dict(os.environ), log_dir)
        self.url: str | None = None
        self.port = 0

    def start(self, options: Iterable[str] | None = None) -> str:
        """Start (or start again) and return the URL; a restart keeps the previous port.

        :param options: replaces the extra CLI options when given
        """
        if options is not None:
            self.options = list(options)
        self.component.argv = [
            str(VENV_BIN / "healthimaging-local"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
            *self.options,
        ]
        self.component.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        offset = self.component.log_path.stat().st_size if self.component.log_path.exists() else 0
        self.component.start()

        def banner() -> str | None:
            if not self.component.alive():
                raise RuntimeError(f"endpoint exited:\n{tail(self.component.log_path)}")
            with self.component.log_path.open("rb") as stream:
                stream.seek(offset)
                for line in stream.read().decode(errors="replace").splitlines():
                    if line.startswith("healthimaging-local: serving on "):
                        return line.split("serving on ", 1)[1].strip()
            return None

        try:
            url = str(wait_until(banner, timeout=60, interval=0.2, what="the endpoint banner"))
        except Exception:
            self.stop()
            raise
        self.url = url
        self.port = int(url.rsplit(":", 1)[1].split("/")[0])
        return url

    def kill(self) -> None:
        self.component.kill()

    def stop(self) -> None:
        self.component.stop()

    def restart(self) -> str:
        """Kill (if alive) and start again on the same state dir and port."""
        if self.component.alive():
            self.component.stop()
        return str(wait_until(self.start, timeout=30, interval=1.0, what="the endpoint to restart"))

    def pids(self) -> list[int]:
        return self.component.pids()
