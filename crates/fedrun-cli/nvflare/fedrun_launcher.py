"""A site-local NVIDIA FLARE job launcher that runs a site's client job (CJ) with fedrun.

Why this exists
---------------
NVFlare's client parent (CP) starts every client job with the launcher component that the site
lists in ``local/resources.json`` (id ``process_launcher``). The stock one,
``ClientProcessJobLauncher``, always runs the CP's own Python interpreter with
``-m nvflare.private.fed.app.client.worker_process``; no job setting can change the program. This
class keeps everything else of the stock process launcher -- the argument list NVFlare builds
(``JOB_PROCESS_ARGS``), the credentials passed in the environment, ``spawn_process`` (own
session, so the CP can kill the whole process group on abort) and ``ProcessHandle`` (exit-code
mapping, the ``_process_rc.txt`` protocol) -- and only swaps the program: the configured
``command`` (for example ``/opt/fedrun/bin/fedrun job``) receives exactly the arguments the stock
worker would receive, minus the ``-m <module>`` pair. NVFlare itself is not modified.

Jobs that do not qualify (see ``opt_in_key`` and ``job_name_pattern``) get the stock Python worker,
so the site needs only this one launcher (NVFlare requires exactly one launcher per site).

How to install it on a site (for example ``site-1`` of a startup kit)
--------------------------------------------------------------------
1. Copy this file to ``site-1/local/custom/fedrun_launcher.py`` (the CP puts ``local/custom`` on
   ``sys.path`` when it starts).
2. Create ``site-1/local/resources.json`` from ``resources.json.default`` and replace the component
   ``{"id": "process_launcher", "path": "nvflare.app_common.job_launcher.client_process_launcher.ClientProcessJobLauncher"}``
   with::

       {
         "id": "process_launcher",
         "path": "fedrun_launcher.ExternalCommandJobLauncher",
         "args": {
           "command": "/abs/path/to/fedrun job",
           "env": {"RUST_LOG": "info"},
           "opt_in_key": "fedrun",
           "job_name_pattern": "hello-.*",
           "record_dir": "/var/log/fedrun-launches"
         }
       }

   Only ``command`` is required; its program must be an absolute path (``posix_spawn`` does not
   search ``PATH``). Do not add a second launcher in a ``*__resources.json`` file: those are
   appended, and NVFlare refuses to start a job when more than one launcher answers.
3. Restart the CP. Its log then shows one line per launched job saying which program ran it and
   its pid, and one line when that process ends (exit code or signal).

Per-job selection
-----------------
* ``opt_in_key``: when set, a job uses fedrun only if its meta says
  ``"launcher_spec": {"site-1": {"process": {"<key>": true}}}`` (or the same under ``"default"``;
  the site entry wins, as NVFlare merges them). The job can only opt in: the program itself is
  always chosen by the site.
* ``job_name_pattern``: when set, the job's ``name`` must match this regular expression
  completely (``re.fullmatch``).
When both are set, both must hold.
"""

import json
import logging
import os
import re
import shlex
import sys
import time
from typing import Dict, Optional

from nvflare.apis.fl_constant import FLContextKey, JobConstants
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey
from nvflare.apis.job_launcher_spec import JobHandleSpec, JobProcessArgs
from nvflare.app_common.job_launcher.process_launcher import ProcessHandle, ProcessJobLauncher
from nvflare.utils.job_launcher_utils import (
    add_custom_dir_to_path,
    generate_client_command,
    get_client_job_args,
    get_credential_env,
    get_job_launcher_spec,
)
from nvflare.utils.process_utils import spawn_process

#: Set in the CJ's environment: the CP's interpreter, so that a wrapper command can still exec the
#: stock worker (``exec "$FEDRUN_CP_PYTHON" -m nvflare.private.fed.app.client.worker_process "$@"``).
CP_PYTHON_ENV = "FEDRUN_CP_PYTHON"


class _LoggedProcessHandle(ProcessHandle):
    """The stock process handle, plus one log line when the process ends or is killed.

    The CP only logs the mapped return code (any signal becomes 1); this line keeps the raw exit
    status, so a site admin can tell "exited 0 by itself" from "SIGKILLed by the CP".
    """

    def __init__(self, process_adapter, logger: logging.Logger, tag: str):
        super().__init__(process_adapter=process_adapter)
        self._logger = logger
        self._tag = tag

    def _raw_exit(self) -> Optional[int]:
        adapter = self.adapter
        if adapter.process is not None:
            return adapter.process.returncode
        return adapter.poll()

    def wait(self):
        super().wait()
        raw = self._raw_exit()
        if raw is None:
            self._logger.info(f"{self._tag} wait returned but the exit status is unknown")
        elif raw < 0:
            self._logger.warning(f"{self._tag} process {self.adapter.pid} was killed by signal {-raw}")
        else:
            self._logger.info(f"{self._tag} process {self.adapter.pid} exited with code {raw}")

    def terminate(self, *args, **kwargs):
        # The CP calls this only when the job did not end by itself (abort grace period over).
        self._logger.warning(f"{self._tag} terminating process group of pid {self.adapter.pid} (SIGKILL)")
        super().terminate()


class ExternalCommandJobLauncher(ProcessJobLauncher):
    """Runs qualifying client jobs of this site with an external command (fedrun) instead of
    NVFlare's Python worker process; every other job gets the stock worker."""

    def __init__(
        self,
        command: str,
        env: Optional[Dict[str, str]] = None,
        opt_in_key: Optional[str] = None,
        job_name_pattern: Optional[str] = None,
        record_dir: Optional[str] = None,
    ):
        """
        Args:
            command: the program and its leading arguments, e.g. ``"/opt/fedrun/bin/fedrun job"``.
                The program must be an absolute path.
            env: extra environment variables for the external command only (not for stock jobs).
            opt_in_key: if set, only jobs whose ``launcher_spec`` process section has this key set
                to ``true`` (for this site or ``default``) use the command.
            job_name_pattern: if set, only jobs whose name fully matches this regex use the command.
            record_dir: if set, one JSON file per launched job (``<job_id>.json``: site, argv, pid,
                program kind, launch time) is written there; credentials are never recorded.
        """
        super().__init__()
        if not isinstance(command, str) or not command.strip():
            raise ValueError("ExternalCommandJobLauncher: 'command' must be a non-empty string")
        prefix = shlex.split(command, True)
        if not os.path.isabs(prefix[0]):
            raise ValueError(
                f"ExternalCommandJobLauncher: the program of 'command' must be an absolute path, got {prefix[0]!r}"
            )
        if env is not None and not (
            isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise ValueError("ExternalCommandJobLauncher: 'env' must map strings to strings")
        self.command = command
        self.extra_env = dict(env or {})
        self.opt_in_key = opt_in_key
        self.job_name_re = re.compile(job_name_pattern) if job_name_pattern else None
        self.record_dir = record_dir
        self.logger = logging.getLogger(self.__class__.__name__)

    # ---- selection ---------------------------------------------------------------------------

    def uses_command(self, job_meta: dict, site: str) -> bool:
        """Whether this job, on this site, runs with the external command (else the stock worker)."""
        if self.opt_in_key:
            process_spec = get_job_launcher_spec(job_meta, site, "process") or {}
            if process_spec.get(self.opt_in_key) is not True:
                return False
        if self.job_name_re is not None:
            name = job_meta.get(JobMetaKey.JOB_NAME.value)
            if not isinstance(name, str) or not self.job_name_re.fullmatch(name):
                return False
        return True

    # ---- command line ------------------------------------------------------------------------

    @staticmethod
    def _worker_args(fl_ctx: FLContext) -> str:
        """The stock worker's arguments without the ``-m <module>`` pair, rendered the way NVFlare
        renders them (``option value`` pairs; the ``--set`` value holds several words that
        ``shlex.split`` turns into separate arguments, exactly as for the stock worker)."""
        job_args = fl_ctx.get_prop(FLContextKey.JOB_PROCESS_ARGS)
        if not job_args:
            raise RuntimeError(f"missing {FLContextKey.JOB_PROCESS_ARGS} in FLContext")
        parts = []
        for name in get_client_job_args(include_exe_module=False, include_set_options=True):
            entry = job_args.get(name)
            if not entry:
                continue
            option, value = entry
            parts.append(f"{option} {value}")
        return " ".join(parts)

    def get_command(self, job_meta, fl_ctx) -> str:
        site = self._site(fl_ctx)
        if self.uses_command(job_meta, site):
            return f"{self.command} {self._worker_args(fl_ctx)}"
        return generate_client_command(fl_ctx)

    # ---- launch ------------------------------------------------------------------------------

    @staticmethod
    def _site(fl_ctx: FLContext) -> str:
        job_args = fl_ctx.get_prop(FLContextKey.JOB_PROCESS_ARGS) or {}
        entry = job_args.get(JobProcessArgs.CLIENT_NAME)
        if entry and entry[1]:
            return str(entry[1])
        return fl_ctx.get_identity_name() or "?"

    def launch_job(self, job_meta: dict, fl_ctx: FLContext) -> JobHandleSpec:
        job_id = job_meta.get(JobConstants.JOB_ID)
        site = self._site(fl_ctx)
        tag = f"[job={job_id} site={site}]"
        external = self.uses_command(job_meta, site)

        # The same environment the stock launcher builds: the CP's, the job's custom dir on
        # PYTHONPATH, and the job credentials (never on the command line).
        env = os.environ.copy()
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        custom_dir = workspace.get_app_custom_dir(job_id)
        if custom_dir != "":
            add_custom_dir_to_path(custom_dir, env)
        env.update(get_credential_env(fl_ctx.get_prop(FLContextKey.JOB_PROCESS_ARGS) or {}))
        if external:
            env[CP_PYTHON_ENV] = sys.executable
            env.update(self.extra_env)

        argv = shlex.split(self.get_command(job_meta, fl_ctx), True)
        kind = "external" if external else "stock"
        self.logger.info(
            f"{tag} launching {kind} client job: program={argv[0]} argv={argv[1:]}"
            + (f" extra_env={sorted(self.extra_env)}" if external and self.extra_env else "")
        )
        adapter = spawn_process(argv, env)
        self.logger.info(f"{tag} {kind} client job started: pid={adapter.pid} program={argv[0]}")
        self._record(job_id, site, kind, argv, adapter.pid, tag)
        return _LoggedProcessHandle(adapter, self.logger, f"{tag} {kind} client job")

    def _record(self, job_id, site, kind, argv, pid, tag):
        if not self.record_dir:
            return
        record = {"job_id": job_id, "site": site, "kind": kind, "argv": argv, "pid": pid, "launched_at": time.time()}
        try:
            os.makedirs(self.record_dir, exist_ok=True)
            path = os.path.join(self.record_dir, f"{job_id}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(record, f)
        except OSError as e:
            # A record is a convenience; never fail a launch for it.
            self.logger.warning(f"{tag} could not write launch record to {self.record_dir}: {e}")
