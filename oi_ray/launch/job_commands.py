"""``oi-ray job status|logs|stop|list``: the jobs of a cluster's job server."""

import datetime

from ray.job_submission import JobSubmissionClient

from oi_ray.errors import ConfigError
from oi_ray.launch.jobs import connect, follow, job_server


def run_job_command(verb: str, submission_id: str | None, address: str | None, follow_logs: bool) -> None:
    """Carry out ``oi-ray job <verb> [ID]`` against the job server at ``address``."""
    server = job_server(address)
    client = connect(server)
    if verb == "list":
        _list(client)
        return
    if not submission_id:
        raise ConfigError(f"oi-ray job {verb} needs a job id (see `oi-ray job list`)")
    _check_exists(client, submission_id)
    if verb == "status":
        info = client.get_job_info(submission_id)
        print(f"{submission_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    elif verb == "logs" and follow_logs:
        follow(client, submission_id, server)
    elif verb == "logs":
        print(client.get_job_logs(submission_id), end="")
    else:
        stopped = client.stop_job(submission_id)
        print(f"{submission_id}: " + ("stop requested" if stopped else
                                      f"not running ({client.get_job_status(submission_id).value})"))


def _check_exists(client: JobSubmissionClient, submission_id: str) -> None:
    known = {job.submission_id for job in client.list_jobs()}
    if submission_id not in known:
        raise ConfigError(f"no job {submission_id!r} on {client.get_address()} (see `oi-ray job list`)")


def _list(client: JobSubmissionClient) -> None:
    jobs = sorted((job for job in client.list_jobs() if job.submission_id),
                  key=lambda job: job.start_time or 0)
    print(f"{'job':<36}{'status':<11}{'task':<15}{'started':<21}")
    for job in jobs:
        started = (datetime.datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
                   if job.start_time else "-")
        task = (job.metadata or {}).get("oi_ray_task", "-")
        print(f"{job.submission_id:<36}{job.status.value:<11}{task:<15}{started:<21}")
