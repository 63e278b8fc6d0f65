#!/usr/bin/env python3
"""End-to-end check of a client job (CJ) command inside a real NVIDIA FLARE 2.9 POC on loopback.

Why this exists: fedrun's `fedrun job` must be a drop-in replacement for NVFlare's Python worker
process. The only convincing test is a real federation: a real server, two real client parents
(CPs), the real admin API, a real ScatterAndGather job. This harness builds such a POC in a scratch
directory, switches site-1 to fedrun's site launcher (crates/fedrun-cli/nvflare/fedrun_launcher.py)
with a given CJ command, runs the hello-numpy job (or aborts it, or runs hello-numpy-cross-val:
the same training, then cross-site validation), checks the outcome from the outside (job status,
CP logs, server log, the final model file, the cross-validation results) and prints ONE JSON line:

    {"result": "PASS" | "FAIL", "scenario": ..., "errors": [...], "timings": {...}, ...}

Exit code 0 on PASS, 1 on FAIL, 2 on bad usage. Uses only the standard library and nvflare.

Run by hand (with the stock worker behind the launcher):

    .venv/bin/python tests/e2e/nvflare_poc.py --mode clear --scenario complete
    .venv/bin/python tests/e2e/nvflare_poc.py --mode clear --scenario complete --np-download-chunk-size 0
    .venv/bin/python tests/e2e/nvflare_poc.py --mode clear --scenario abort
    .venv/bin/python tests/e2e/nvflare_poc.py --mode clear --scenario cross_val
    .venv/bin/python tests/e2e/nvflare_poc.py --mode default --scenario complete \
        --cj-command "$PWD/target/debug/fedrun job"

Modes: `clear` switches the kit to scheme tcp, connection_security clear, 127.0.0.1 and a free
port; `mtls_tcp` switches it to scheme tcp and keeps mTLS (every CJ, fedrun's too, dials the
server over TLS with the site's certificate, as in a provisioned tcp deployment); `default` leaves `nvflare poc prepare`'s kit (scheme http, mTLS) and only moves the server
to 127.0.0.1 and a free port. In `default` the stock worker gets NVFLARE_BACKBONE_CONN_GEN=1 so that it
reaches the server through its parent only (NVFlare's relay wiring); fedrun's CJ must find that
route by itself (the harness then checks its log says so).

Every process is started in its own session and every process group the run created (server,
CPs, and the server/client jobs they spawn) is killed when the harness ends, pass or fail
(try/finally, atexit, SIGTERM/SIGINT/SIGHUP). The scratch directory (kit, logs, job) is removed
after a PASS and kept after a FAIL (or with --keep); its path is in the JSON line.
"""

import argparse
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER_SRC = os.path.join(REPO, "crates", "fedrun-cli", "nvflare", "fedrun_launcher.py")
STOCK_WORKER = os.path.join(REPO, "tests", "e2e", "stock_worker.sh")
STOCK_PROCESS_LAUNCHER = "nvflare.app_common.job_launcher.client_process_launcher.ClientProcessJobLauncher"
FEDRUN_SITE = "site-1"
SITES = ("site-1", "site-2")
ADMIN = "admin@nvidia.com"
EXPECTED_MODEL = [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]
NUM_ROUNDS = 2
# CrossSiteModelEval's name for the server model NPModelLocator finds ("SRV_" + "server").
SERVER_MODEL_OWNER = "SRV_server"

RC_LINE = re.compile(r"run \((?P<job>[0-9a-f-]+)\): child worker process finished with RC (?P<rc>-?\d+)")
ACCEPT_LINE = re.compile(r"Contribution from (?P<site>site-\d+) ACCEPTED by the aggregator at round (?P<round>\d+)")
LAUNCH_EXIT_LINE = re.compile(r"\[job=(?P<job>[0-9a-f-]+) site=(?P<site>[^\]]+)\] external client job process \d+ (?P<how>exited with code|was killed by signal) (?P<code>-?\d+)")
LAUNCH_LINE = re.compile(r"\[job=(?P<job>[0-9a-f-]+) site=(?P<site>[^\]]+)\] external client job started: pid=(?P<pid>\d+)")


class HarnessError(Exception):
    """A step of the run failed; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Every process this run started, each in its own session, and the cleanup of all of them.

    The server and client jobs are spawned by NVFlare (own sessions too), so they are not our
    children: they are found by their command line, which always contains this run's unique
    scratch directory, and their process groups are killed as well.
    """

    def __init__(self, scratch):
        self.scratch = scratch
        self.started = []  # (name, Popen)
        self.cleaned = False

    def start(self, name, argv, cwd, env, log_path):
        log = open(log_path, "ab")
        p = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.started.append((name, p))
        return p

    def _ours_by_cmdline(self):
        """Pids of live processes of this user whose command line mentions the scratch dir."""
        found = []
        me = os.getuid()
        needle = self.scratch.encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid == os.getpid():
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid != me:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        found.append(pid)
            except OSError:
                continue
        return found

    def cleanup(self):
        if self.cleaned:
            return
        self.cleaned = True
        groups = set()
        for _, p in self.started:
            groups.add(p.pid)  # start_new_session: pgid == pid
        for pid in self._ours_by_cmdline():
            try:
                groups.add(os.getpgid(pid))
            except OSError:
                pass
        my_group = os.getpgrp()
        for g in groups:
            if g == my_group or g <= 1:
                continue
            try:
                os.killpg(g, signal.SIGKILL)
            except OSError:
                pass
        for _, p in self.started:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


# ---------------------------------------------------------------------------------------------
# Kit preparation


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path):
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def prepare_kit(scratch, python, mode):
    """`nvflare poc prepare -n 2` in the scratch dir, then the mode's edits. Returns (kit, port)."""
    home = os.path.join(scratch, "home")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, HOME=home, NVFLARE_POC_WORKSPACE=os.path.join(scratch, "poc"))
    r = subprocess.run(
        [python, "-m", "nvflare.cli", "poc", "prepare", "-n", "2", "--force"],
        cwd=scratch,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise HarnessError(f"nvflare poc prepare failed (rc {r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}")
    kit = os.path.join(scratch, "poc", "example_project", "prod_00")
    if not os.path.isdir(os.path.join(kit, "server")):
        raise HarnessError(f"poc prepare made no kit at {kit}")

    port = free_port()
    target = f"127.0.0.1:{port}"

    srv_path = os.path.join(kit, "server", "startup", "fed_server.json")
    srv = read_json(srv_path)
    s0 = srv["servers"][0]
    s0["service"]["target"] = target
    s0["admin_port"] = port
    if mode == "clear":
        s0["service"]["scheme"] = "tcp"
        s0["connection_security"] = "clear"
    elif mode == "mtls_tcp":
        s0["service"]["scheme"] = "tcp"
    write_json(srv_path, srv)

    for site in SITES:
        path = os.path.join(kit, site, "startup", "fed_client.json")
        cli = read_json(path)
        cli["servers"][0]["service"]["target"] = target
        if mode == "clear":
            cli["servers"][0]["service"]["scheme"] = "tcp"
            cli["client"]["connection_security"] = "clear"
        elif mode == "mtls_tcp":
            cli["servers"][0]["service"]["scheme"] = "tcp"
        write_json(path, cli)

    adm_path = os.path.join(kit, ADMIN, "startup", "fed_admin.json")
    adm = read_json(adm_path)
    adm["admin"]["host"] = "127.0.0.1"
    adm["admin"]["port"] = port
    if mode == "clear":
        adm["admin"]["scheme"] = "tcp"
        adm["admin"]["connection_security"] = "clear"
    elif mode == "mtls_tcp":
        adm["admin"]["scheme"] = "tcp"
    write_json(adm_path, adm)

    # Keep the server's job store and snapshots inside the scratch dir (the default is a shared
    # /tmp/nvflare, which would mix runs).
    res_path = os.path.join(kit, "server", "local", "resources.json")
    if not os.path.exists(res_path):
        res_path_default = res_path + ".default"
        shutil.copyfile(res_path_default, res_path)
    res = read_json(res_path)
    store = os.path.join(scratch, "server-store")
    snap = res.get("snapshot_persistor", {}).get("args", {}).get("storage", {}).get("args")
    if isinstance(snap, dict):
        snap["root_dir"] = os.path.join(store, "snapshot-storage")
    for comp in res.get("components", []):
        if comp.get("id") == "job_manager":
            comp.setdefault("args", {})["uri_root"] = os.path.join(store, "jobs-storage")
    write_json(res_path, res)
    return kit, port


def install_launcher(kit, site, cj_command, cj_env, opt_in_key, record_dir):
    """Copy fedrun_launcher.py into <site>/local/custom and make it the site's process launcher."""
    custom = os.path.join(kit, site, "local", "custom")
    os.makedirs(custom, exist_ok=True)
    shutil.copyfile(LAUNCHER_SRC, os.path.join(custom, "fedrun_launcher.py"))
    local = os.path.join(kit, site, "local")
    res = read_json(os.path.join(local, "resources.json.default"))
    args = {"command": cj_command, "env": cj_env, "record_dir": record_dir}
    if opt_in_key:
        args["opt_in_key"] = opt_in_key
    replaced = 0
    for comp in res.get("components", []):
        if comp.get("id") == "process_launcher" and comp.get("path") == STOCK_PROCESS_LAUNCHER:
            comp["path"] = "fedrun_launcher.ExternalCommandJobLauncher"
            comp["args"] = args
            replaced += 1
    if replaced != 1:
        raise HarnessError(f"{site}/local/resources.json.default has {replaced} stock process launchers, expected 1")
    write_json(os.path.join(local, "resources.json"), res)


def write_job(jobs_dir, name, sleep_time, np_download_chunk_size, opt_in_key, num_rounds=NUM_ROUNDS,
              persistor_args=None, train_timeout=60):
    """A copy of NVFlare's hello-numpy-sag job: ScatterAndGather over NPTrainer (+1 per round) and
    NPModelPersistor (initial [[1,2,3],[4,5,6],[7,8,9]]), 2 rounds, 2 clients. The keyword
    arguments exist for the benchmark (more rounds, a big initial model, a longer timeout)."""
    job = os.path.join(jobs_dir, name)
    cfg = os.path.join(job, "app", "config")
    os.makedirs(cfg, exist_ok=True)
    meta = {
        "name": name,
        "resource_spec": {},
        "deploy_map": {"app": ["@ALL"]},
        "min_clients": 2,
    }
    if opt_in_key:
        meta["launcher_spec"] = {FEDRUN_SITE: {"process": {opt_in_key: True}}}
    write_json(os.path.join(job, "meta.json"), meta)
    server = {
        "format_version": 2,
        "task_data_filters": [],
        "task_result_filters": [],
        "workflows": [
            {
                "id": "scatter_and_gather",
                "path": "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather",
                "args": {
                    "min_clients": 2,
                    "num_rounds": num_rounds,
                    "start_round": 0,
                    "wait_time_after_min_received": 0,
                    "aggregator_id": "aggregator",
                    "persistor_id": "persistor",
                    "shareable_generator_id": "shareable_generator",
                    "train_task_name": "train",
                    "train_timeout": train_timeout,
                },
            }
        ],
        "components": [
            {"id": "persistor", "path": "nvflare.app_common.np.np_model_persistor.NPModelPersistor",
             "args": dict(persistor_args or {})},
            {
                "id": "shareable_generator",
                "path": "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator",
                "args": {},
            },
            {
                "id": "aggregator",
                "path": "nvflare.app_common.aggregators.intime_accumulate_model_aggregator.InTimeAccumulateWeightedAggregator",
                "args": {"expected_data_kind": "WEIGHTS"},
            },
        ],
    }
    client = {
        "format_version": 2,
        "executors": [
            {
                "tasks": ["train"],
                "executor": {"path": "nvflare.app_common.np.np_trainer.NPTrainer", "args": {"sleep_time": sleep_time}},
            }
        ],
        "task_result_filters": [],
        "task_data_filters": [],
        "components": [],
    }
    if np_download_chunk_size is not None:
        # A top-level config variable; on the server it decides whether task arrays are sent
        # inline (0) or as download references.
        server["np_download_chunk_size"] = np_download_chunk_size
        client["np_download_chunk_size"] = np_download_chunk_size
    write_json(os.path.join(cfg, "config_fed_server.json"), server)
    write_json(os.path.join(cfg, "config_fed_client.json"), client)
    return job


def write_cross_val_job(jobs_dir, name, opt_in_key):
    """A copy of NVFlare's hello-numpy-cross-val job (job template sag_cross_np): ScatterAndGather
    (NPTrainer +1 per round, NPModelPersistor, 2 rounds) then CrossSiteModelEval, which asks every
    client for its local model (`submit_model`, NPTrainer) and has every client validate the
    server's model and every submitted model (`validate`, NPValidator). NPModelLocator finds the
    server's model, NPFormatter formats the results and ValidationJsonGenerator writes them to
    `<run dir>/cross_site_val/cross_val_results.json` as {data_client: {model_owner: metrics}}.
    Timeouts are short: a lost task must fail the run within the harness's deadline."""
    job = write_job(jobs_dir, name, 0, None, opt_in_key, train_timeout=30)
    cfg = os.path.join(job, "app", "config")
    server_path = os.path.join(cfg, "config_fed_server.json")
    server = read_json(server_path)
    server["components"] += [
        {"id": "model_locator", "path": "nvflare.app_common.np.np_model_locator.NPModelLocator", "args": {}},
        {"id": "formatter", "path": "nvflare.app_common.np.np_formatter.NPFormatter", "args": {}},
        {"id": "json_generator", "path": "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator",
         "args": {}},
    ]
    server["workflows"].append({
        "id": "cross_site_model_eval",
        "path": "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval",
        "args": {
            "model_locator_id": "model_locator",
            "formatter_id": "formatter",
            "submit_model_timeout": 30,
            "validation_timeout": 30,
            "cleanup_models": False,
        },
    })
    write_json(server_path, server)
    client_path = os.path.join(cfg, "config_fed_client.json")
    client = read_json(client_path)
    client["executors"] = [
        {"tasks": ["train", "submit_model"],
         "executor": {"path": "nvflare.app_common.np.np_trainer.NPTrainer", "args": {}}},
        {"tasks": ["validate"],
         "executor": {"path": "nvflare.app_common.np.np_validator.NPValidator", "args": {}}},
    ]
    write_json(client_path, client)
    return job


# ---------------------------------------------------------------------------------------------
# Waiting on logs


def read_text(path):
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def wait_for(what, predicate, deadline, procs=(), poll=0.2):
    """Poll `predicate()` until it returns a truthy value or the deadline passes; fail early if
    one of `procs` (name, Popen) died."""
    while True:
        value = predicate()
        if value:
            return value
        for name, p in procs:
            if p.poll() is not None:
                raise HarnessError(f"{name} exited with {p.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out waiting for {what}")
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------
# The run


class Poc:
    """A running POC: the kit, its logs, the processes and an admin session."""

    def __init__(self, kit, port, logs, server_log, site_logs, all_procs, session, record_dir):
        self.kit = kit
        self.port = port
        self.logs = logs
        self.server_log = server_log
        self.site_logs = site_logs
        self.all_procs = all_procs
        self.session = session
        self.record_dir = record_dir


def is_stock_worker(cj_command):
    """Is this CJ command the wrapper around NVFlare's own worker?"""
    return "stock_worker" in (cj_command or "stock_worker")


def start_poc(scratch, procs, python, mode, cj_command, cj_env, opt_in_key, deadline, timings):
    """Prepare the kit, install the launcher on site-1, start server and both CPs, wait until both
    clients are registered, open an admin session. Returns a `Poc`."""
    t0 = time.monotonic()
    kit, port = prepare_kit(scratch, python, mode)
    record_dir = os.path.join(scratch, "launch-records")
    cj_env = dict(cj_env)
    if mode == "default" and is_stock_worker(cj_command):
        # NVFlare's own worker would dial the server on the kit's scheme: make it reach the
        # server through its parent (the CP relays), as NVFlare's relay kits do. fedrun's CJ
        # decides this by itself from the kit (scheme http, mTLS), so it gets nothing here.
        cj_env.setdefault("NVFLARE_BACKBONE_CONN_GEN", "1")
    install_launcher(kit, FEDRUN_SITE, cj_command, cj_env, opt_in_key, record_dir)
    timings["prepare"] = round(time.monotonic() - t0, 2)

    logs = os.path.join(scratch, "logs")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, HOME=os.path.join(scratch, "home"), PYTHONUNBUFFERED="1")
    env.pop("NVFLARE_POC_WORKSPACE", None)

    server_log = os.path.join(logs, "server.log")
    server = procs.start(
        "server",
        [python, "-u", "-m", "nvflare.private.fed.app.server.server_train", "-m", os.path.join(kit, "server"),
         "-s", "fed_server.json", "--set", "secure_train=true", "org=nvidia", "config_folder=config"],
        cwd=os.path.join(kit, "server"), env=env, log_path=server_log,
    )
    site_logs = {}
    clients = []
    for site in SITES:
        site_logs[site] = os.path.join(logs, f"{site}.log")
        clients.append((site, procs.start(
            site,
            [python, "-u", "-m", "nvflare.private.fed.app.client.client_train", "-m", os.path.join(kit, site),
             "-s", "fed_client.json", "--set", "secure_train=true", f"uid={site}", "org=nvidia", "config_folder=config"],
            cwd=os.path.join(kit, site), env=env, log_path=site_logs[site],
        )))
    all_procs = [("server", server)] + clients
    wait_for("server start", lambda: "Server started" in read_text(server_log), deadline, all_procs)
    for site in SITES:
        wait_for(f"{site} registration", lambda s=site: "Successfully registered client" in read_text(site_logs[s]),
                 deadline, all_procs)
    timings["start"] = round(time.monotonic() - t0, 2)

    from nvflare.fuel.flare_api.flare_api import new_secure_session

    sess = new_secure_session(ADMIN, os.path.join(kit, ADMIN), timeout=max(5.0, deadline - time.monotonic()))
    try:
        # Both clients must be known to the server before a 2-client job can be scheduled.
        def both_clients():
            info = sess.get_system_info()
            return set(SITES) <= {c.name for c in info.client_info}

        wait_for("both clients in the server's client list", both_clients, deadline, all_procs, poll=0.5)
    except BaseException:
        sess_close(sess)
        raise
    return Poc(kit, port, logs, server_log, site_logs, all_procs, sess, record_dir)


def run(args, scratch, procs, result):
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    timings = result["timings"]
    poc = start_poc(scratch, procs, args.python, args.mode, args.cj_command, args.cj_env, args.opt_in_key,
                    deadline, timings)
    kit, server_log, site_logs, all_procs, sess = poc.kit, poc.server_log, poc.site_logs, poc.all_procs, poc.session
    result["kit"] = kit
    result["port"] = poc.port
    result["logs"] = poc.logs
    try:
        sleep_time = args.sleep_time if args.sleep_time is not None else (30 if args.scenario == "abort" else 0)
        if args.scenario == "cross_val":
            job_dir = write_cross_val_job(os.path.join(scratch, "jobs"), "hello-numpy-cross-val", args.opt_in_key)
        else:
            job_dir = write_job(os.path.join(scratch, "jobs"), "hello-numpy", sleep_time, args.np_download_chunk_size,
                                args.opt_in_key)
        t_submit = time.monotonic()
        job_id = sess.submit_job(job_dir)
        result["job_id"] = job_id

        if args.scenario == "abort":
            # Abort while site-1's train task runs: wait until the server has handed out the task.
            wait_for("the first train task to be sent to site-1",
                     lambda: "sent task assignment to client. client_name:site-1" in read_text(server_log),
                     deadline, all_procs)
            time.sleep(args.abort_after)
            t_abort = time.monotonic()
            sess.abort_job(job_id)
            timings["abort_sent_after_submit"] = round(t_abort - t_submit, 2)

        def finished():
            meta = sess.get_job_meta(job_id)
            status = meta.get("status", "")
            return status if status.startswith("FINISHED") else None
        status = wait_for(f"job {job_id} to finish", finished, deadline, all_procs, poll=0.5)
        timings["job"] = round(time.monotonic() - t_submit, 2)
        result["status"] = status
    except BaseException:
        sess_close(sess)
        raise

    errors = result["errors"]
    expected_status = "FINISHED:ABORTED" if args.scenario == "abort" else "FINISHED:COMPLETED"
    if status != expected_status:
        errors.append(f"job status {status}, expected {expected_status}")

    # The CPs log the child's return code after it exited; wait for both.
    def rcs():
        found = {}
        for site in SITES:
            for m in RC_LINE.finditer(read_text(site_logs[site])):
                if m.group("job") == job_id:
                    found[site] = int(m.group("rc"))
        return found if len(found) == len(SITES) else None
    try:
        found = wait_for("both CPs to report their CJ's return code", rcs, deadline, all_procs)
    except HarnessError as e:
        found = rcs() or {}
        errors.append(str(e))
    result["cj_rc"] = found
    timings["cj_exit"] = round(time.monotonic() - t_submit, 2)
    for site in SITES:
        if site in found and found[site] != 0:
            errors.append(f"{site}: child worker process finished with RC {found[site]}, expected 0")

    # The launcher's own lines: site-1's CJ was started by the external command and ended by
    # itself with exit code 0 (not killed by the CP).
    s1 = read_text(site_logs[FEDRUN_SITE])
    launched = [m for m in LAUNCH_LINE.finditer(s1) if m.group("job") == job_id]
    if len(launched) != 1:
        errors.append(f"site-1: expected one 'external client job started' line for the job, found {len(launched)}")
    else:
        result["cj_pid"] = int(launched[0].group("pid"))
    exits = [m for m in LAUNCH_EXIT_LINE.finditer(s1) if m.group("job") == job_id]
    if len(exits) != 1:
        errors.append(f"site-1: expected one launcher exit line for the job, found {len(exits)}")
    elif exits[0].group("how") != "exited with code" or exits[0].group("code") != "0":
        errors.append(f"site-1: CJ {exits[0].group('how')} {exits[0].group('code')}, expected exited with code 0")
    if "terminating process group" in s1:
        errors.append("site-1: the CP terminated (SIGKILLed) the CJ's process group")
    if args.mode == "default" and not is_stock_worker(args.cj_command):
        # fedrun's CJ must see by itself that it cannot dial an http+mTLS server
        if "reaching the server through the parent" not in s1:
            errors.append("site-1: fedrun's CJ did not say it reaches the server through its parent")
    if args.mode == "mtls_tcp" and not is_stock_worker(args.cj_command):
        # a tcp kit with mTLS: fedrun's CJ dials the server itself, over TLS
        if "over mtls" not in s1:
            errors.append("site-1: fedrun's CJ did not say it connects to the server over mtls")

    if args.scenario in ("complete", "cross_val"):
        server_text = read_text(server_log) + read_text(os.path.join(kit, "server", job_id, "log.txt"))
        accepted = {(m.group("site"), int(m.group("round"))) for m in ACCEPT_LINE.finditer(server_text)}
        result["accepted"] = sorted(f"{s}@{r}" for s, r in accepted)
        for r in range(NUM_ROUNDS):
            for site in SITES:
                if (site, r) not in accepted:
                    errors.append(f"server did not log an accepted contribution from {site} in round {r}")
    files = JobFiles(kit, job_id, sess, errors)
    if args.scenario in ("complete", "cross_val"):
        check_model(files, result)
    if args.scenario == "cross_val":
        check_cross_val(files, result)
    sess_close(sess)


def sess_close(sess):
    try:
        sess.close()
    except Exception:
        pass


class JobFiles:
    """Files of the server's job workspace: in the run dir if it is still there, else in the job
    result fetched with download_job_result (the server moves the workspace into its job store
    when the job ends). The download is done at most once and reused."""

    def __init__(self, kit, job_id, sess, errors):
        self.run_dir = os.path.join(kit, "server", job_id)
        self.job_id = job_id
        self.sess = sess
        self.errors = errors
        self.download = None
        self.tried = False

    def find(self, relative):
        local = os.path.join(self.run_dir, relative)
        if os.path.exists(local):
            return local
        if not self.tried:
            self.tried = True
            try:
                self.download = self.sess.download_job_result(self.job_id)
            except Exception as e:  # reported once; every caller then says what it missed
                self.errors.append(f"could not download the job result: {e}")
        if not self.download:
            return None
        wanted = os.sep + os.path.normpath(relative)
        for root, _, files in os.walk(self.download):
            for name in files:
                path = os.path.join(root, name)
                if os.path.normpath(path).endswith(wanted):
                    return path
        return None


def check_model(files, result):
    """The final global model saved by NPModelPersistor in the server's job workspace."""
    import numpy as np

    path = files.find(os.path.join("models", "server.npy"))
    if path is None:
        result["errors"].append("final model models/server.npy not found (run dir and job result)")
        return
    model = np.load(path, allow_pickle=False)
    result["model"] = model.tolist()
    result["model_path"] = path
    if model.shape != (3, 3) or not np.array_equal(model, np.array(EXPECTED_MODEL, dtype=model.dtype)):
        result["errors"].append(f"final model {model.tolist()} != {EXPECTED_MODEL}")


def check_cross_val(files, result):
    """The cross-site validation results ValidationJsonGenerator wrote into the server's job
    workspace, as {data_client: {model_owner: metrics}}. Every client validates the server's model
    (SRV_server) and every submitted client model. Checked: site-1 (the CJ under test, as
    NPValidator) validated each of them, and site-2 validated site-1's model (so site-1's
    submit_model reply was a model). Every model is [[3..11]] after 2 rounds (the clients' local
    models are their last training result), so each accuracy is 63/11 + random in [0, 1)."""
    errors = result["errors"]
    path = files.find(os.path.join("cross_site_val", "cross_val_results.json"))
    if path is None:
        errors.append("cross_site_val/cross_val_results.json not found (run dir and job result)")
        return
    try:
        results = read_json(path)
    except (OSError, ValueError) as e:
        errors.append(f"cross-val results {path} unreadable: {e}")
        return
    result["cross_val"] = results
    result["cross_val_path"] = path
    if not isinstance(results, dict):
        errors.append(f"cross-val results are not an object: {results!r}")
        return
    low = sum(sum(row) for row in EXPECTED_MODEL) / max(max(row) for row in EXPECTED_MODEL)
    expected = {
        FEDRUN_SITE: [SERVER_MODEL_OWNER] + list(SITES),
        "site-2": [FEDRUN_SITE],
    }
    for data_client, owners in expected.items():
        made = results.get(data_client)
        if not isinstance(made, dict):
            errors.append(f"cross-val: no validation results made by {data_client} (have {sorted(results)})")
            continue
        for owner in owners:
            metrics = made.get(owner)
            if not isinstance(metrics, dict):
                errors.append(f"cross-val: {data_client} has no result for {owner}'s model (has {sorted(made)})")
                continue
            acc = metrics.get("accuracy")
            if isinstance(acc, bool) or not isinstance(acc, (int, float)):
                errors.append(f"cross-val: {data_client} on {owner}'s model: accuracy {acc!r} is not a number")
            elif not low <= acc < low + 1:
                errors.append(f"cross-val: {data_client} on {owner}'s model: accuracy {acc} not in [{low}, {low + 1})")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("clear", "default", "mtls_tcp"), default="clear")
    ap.add_argument("--scenario", choices=("complete", "abort", "cross_val"), default="complete",
                    help="complete: hello-numpy SAG; abort: abort it during a task; "
                         "cross_val: SAG then CrossSiteModelEval (hello-numpy-cross-val)")
    ap.add_argument("--cj-command", default=STOCK_WORKER,
                    help="site-1's CJ command (absolute program + args), default: the stock worker wrapper")
    ap.add_argument("--cj-env", action="append", default=[], metavar="K=V", help="extra env for site-1's CJ")
    ap.add_argument("--np-download-chunk-size", type=int, default=None,
                    help="job config np_download_chunk_size (default: NVFlare's default; 0 = arrays inline)")
    ap.add_argument("--sleep-time", type=int, default=None, help="NPTrainer sleep_time (default 0; abort: 30)")
    ap.add_argument("--abort-after", type=float, default=3.0, help="seconds after the task is sent before aborting")
    ap.add_argument("--opt-in-key", default=None, help="configure the launcher with opt_in_key and opt the job in")
    ap.add_argument("--timeout", type=float, default=60.0, help="deadline of the whole run in seconds")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir even on PASS")
    ap.add_argument("--scratch-parent", default=None, help="where to create the scratch dir (default: TMPDIR)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that has nvflare 2.9 (default: this one)")
    args = ap.parse_args(argv)
    env_pairs = {}
    for item in args.cj_env:
        if "=" not in item:
            ap.error(f"--cj-env needs K=V, got {item!r}")
        k, v = item.split("=", 1)
        env_pairs[k] = v
    args.cj_env = env_pairs
    program = args.cj_command.split()[0] if args.cj_command.strip() else ""
    if not os.path.isabs(program) or not os.access(program, os.X_OK):
        ap.error(f"--cj-command program must be an absolute path to an executable, got {program!r}")
    return args


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    scratch = tempfile.mkdtemp(prefix=f"fedrun-e2e-{args.mode}-{args.scenario}-", dir=args.scratch_parent)
    procs = Processes(scratch)
    atexit.register(procs.cleanup)

    def on_signal(signum, _frame):
        procs.cleanup()
        sys.stderr.write(f"nvflare_poc: killed by signal {signum}; scratch dir kept: {scratch}\n")
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    result = {
        "result": "FAIL",
        "mode": args.mode,
        "scenario": args.scenario,
        "cj_command": args.cj_command,
        "np_download_chunk_size": args.np_download_chunk_size,
        "dir": scratch,
        "errors": [],
        "timings": {},
    }
    t0 = time.monotonic()
    try:
        # NVFlare's admin API prints progress on stdout; keep stdout for the one JSON line.
        with contextlib.redirect_stdout(sys.stderr):
            run(args, scratch, procs, result)
    except HarnessError as e:
        result["errors"].append(str(e))
    except Exception as e:
        result["errors"].append(f"{type(e).__name__}: {e}")
        result["traceback"] = traceback.format_exc()[-3000:]
    finally:
        procs.cleanup()
    result["timings"]["total"] = round(time.monotonic() - t0, 2)
    if not result["errors"]:
        result["result"] = "PASS"
    if result["result"] == "PASS" and not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
        result["dir"] = None
    else:
        result["kept_dir"] = scratch
    print(json.dumps(result), flush=True)
    return 0 if result["result"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
