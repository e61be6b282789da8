"""Ray Jobs: an oi-ray task submitted to a cluster's job server, its logs followed to the end.

The job runs the same command line on the cluster (:mod:`oi_ray.launch.entry`) with the spec
that travels in its runtime environment: resolved, overrides applied, ``ray.address: auto``
(join the cluster the job runs on) and ``ray.job_id``, which names the job and its Ray Train
run. A job id that finished before is resubmitted as ``<id>-2``, ``<id>-3`` ... (Ray never
reuses a submission id) with the same run name, so training resumes from its last checkpoint.
"""

import asyncio
import dataclasses
import logging
import os
import sys
import time
from typing import Any, TypeVar

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from oi_ray.config import to_yaml
from oi_ray.config.schema import ExperimentConfig
from oi_ray.console import command
from oi_ray.errors import ConfigError, OiRayError, TaskInterrupted
from oi_ray.ray_internals import JOB_SDK_LOGGER, NO_JOB_AGENT_MESSAGE, auth_token

log = logging.getLogger(__name__)
Client = TypeVar("Client")
SPEC_VARIABLE = "OI_RAY_JOB_SPEC"  # the job's resolved spec, as YAML, for oi_ray.launch.entry
AGENT_WAIT_S = 60.0
TOKEN_HELP = ("give the cluster's token as RAY_AUTH_TOKEN, or in the file RAY_AUTH_TOKEN_PATH names "
              "(default ~/.ray/auth_token)")


class JobFailedError(OiRayError):
    """The submitted job ended without success; its exit status is the job's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def job_server(address: str | None) -> str:
    """The job server to use: ``--address``, else ``RAY_ADDRESS`` when it is a dashboard URL."""
    chosen = address or os.environ.get("RAY_ADDRESS", "")
    if not chosen.startswith(("http://", "https://")):
        raise ConfigError(f"--address {chosen or '(none)'}: expected the cluster's dashboard / job server "
                          f"URL, e.g. http://head:8265 (or set RAY_ADDRESS to it)")
    return chosen.rstrip("/")


def connect(address: str) -> JobSubmissionClient:
    """A client of the job server at ``address``, checked to answer and to accept the user's token."""
    return dashboard_client(JobSubmissionClient, address, "job server")


def dashboard_client(client_class: type[Client], address: str, server: str) -> Client:
    """A Ray dashboard client (jobs, Serve) of ``address``, checked to answer and to accept the
    user's Ray token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), which
    is sent whenever there is one: the cluster decides whether it needs it."""
    try:
        return client_class(address, headers=auth_headers())
    except ConnectionError:
        raise ConfigError(f"--address {address}: no Ray {server} answers there") from None
    except AuthenticationError as error:
        raise ConfigError(f"--address {address}: {token_problem(error)}") from None


def token_problem(error: AuthenticationError) -> str:
    """What to tell a user whose request the cluster's token authentication refused."""
    said = _first_line(error)
    if auth_headers() is None:
        return f"the cluster requires a Ray token and none was found ({said}); {TOKEN_HELP}"
    return f"the cluster refused this Ray token ({said}); {TOKEN_HELP}"


def auth_headers() -> dict[str, str] | None:
    """The user's Ray token as an HTTP header, when there is one."""
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token is not None else None


def submit(client: JobSubmissionClient, task: str, config: ExperimentConfig, options: list[str]) -> str:
    """Submit ``oi-ray <task>`` of ``config`` (plus command-line ``options``); the submission id."""
    run_name = config.ray.job_id or f"oi-ray-{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    submission_id = _free_submission_id(client, run_name)
    on_cluster = dataclasses.replace(config.ray, address="auto", job_id=run_name)  # join the job's cluster
    job_config = dataclasses.replace(config, ray=on_cluster)
    environment = config.ray.runtime_env
    runtime_env: dict[str, Any] = {"env_vars": {**environment.env_vars, SPEC_VARIABLE: to_yaml(job_config)}}
    if environment.pip:
        runtime_env["pip"] = list(environment.pip)
    if environment.working_dir:
        runtime_env["working_dir"] = environment.working_dir
    entrypoint = " ".join(["python", "-m", "oi_ray.launch.entry", task, *options])
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                              metadata={"oi_ray_task": task, "run_name": run_name})
            break
        except RuntimeError as error:  # a head that just started has no job agent for some seconds
            if NO_JOB_AGENT_MESSAGE not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    log.info("submitted job %s (oi-ray %s, run %s) to %s", submission_id, task, run_name,
             client.get_address())
    return submission_id


def run_as_job(task: str, config: ExperimentConfig, address: str, options: list[str], wait: bool) -> None:
    """Submit ``oi-ray <task>`` to the job server at ``address``; follow it to its end unless
    ``wait`` is false (then print the submission id and return)."""
    client = connect(address)
    submission_id = submit(client, task, config, options)
    if wait:
        follow(client, submission_id, address)
        return
    print(submission_id)
    log.info("follow it with %s", command("job", "logs", submission_id, "--follow", "--address", address))


def _free_submission_id(client: JobSubmissionClient, run_name: str) -> str:
    """``run_name``, or the next ``run_name-N`` when earlier jobs of that run have finished."""
    jobs = {job.submission_id: job for job in client.list_jobs() if job.submission_id}
    candidate, attempt, earlier = run_name, 1, None
    while candidate in jobs:
        earlier = jobs[candidate]
        if not earlier.status.is_terminal():
            raise ConfigError(f"job {candidate} of run {run_name} is still {earlier.status.value}: follow it "
                              f"with `oi-ray job logs {candidate} --follow`, or stop it with "
                              f"`oi-ray job stop {candidate}`")
        attempt += 1
        candidate = f"{run_name}-{attempt}"
    if earlier is not None:
        log.info("run %s ran before as job %s (%s): submitting it as %s, which continues the run",
                 run_name, earlier.submission_id, earlier.status.value, candidate)
    return candidate


def follow(client: JobSubmissionClient, submission_id: str, address: str) -> None:
    """Print the job's logs until it ends; raise unless it succeeded. On Ctrl-C, ask whether to
    stop the job (without a terminal: leave it running) and say how to reach it again."""
    try:
        asyncio.run(_print_logs(client, submission_id))
    except KeyboardInterrupt:
        _interrupted(client, submission_id, address)
    info = _wait_until_terminal(client, submission_id)
    if info.status == JobStatus.SUCCEEDED:
        log.info("job %s succeeded", submission_id)
        return
    if info.status == JobStatus.STOPPED:
        raise TaskInterrupted(f"job {submission_id} was stopped")
    exit_code = info.driver_exit_code if info.driver_exit_code not in (None, 0) else 1
    reason = (info.message or "").strip().splitlines()[0] if info.message else "no reason given"
    raise JobFailedError(f"job {submission_id} failed: {reason.split(', last available logs')[0]}", exit_code)


async def _print_logs(client: JobSubmissionClient, submission_id: str) -> None:
    logging.getLogger(JOB_SDK_LOGGER).setLevel(logging.WARNING)  # "WebSocket closed"
    async for lines in client.tail_job_logs(submission_id):
        print(lines, end="", flush=True)


def _interrupted(client: JobSubmissionClient, submission_id: str, address: str) -> None:
    stop_command = command("job", "stop", submission_id, "--address", address)
    if sys.stdin.isatty():
        try:
            answer = input(f"\nstop job {submission_id} on the cluster? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer.strip().lower() in ("y", "yes"):
            client.stop_job(submission_id)
            raise TaskInterrupted(f"job {submission_id} stopped")
    raise TaskInterrupted(f"job {submission_id} is left running; follow it with "
                          f"{command('job', 'logs', submission_id, '--follow', '--address', address)}, "
                          f"stop it with {stop_command}")


def _wait_until_terminal(client: JobSubmissionClient, submission_id: str, timeout_s: float = 30.0) -> Any:
    """The job's final info (the log stream can end a moment before the status changes)."""
    deadline = time.monotonic() + timeout_s
    info = client.get_job_info(submission_id)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        info = client.get_job_info(submission_id)
    return info


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]
