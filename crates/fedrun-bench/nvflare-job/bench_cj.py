#!/usr/bin/env python3
"""Client-job (CJ) cost in a real NVIDIA FLARE 2.9 POC: site-1's CJ command vs NVFlare's Python CJ.

Why this exists: the point of `fedrun job` is a cheaper client job. This script measures it where
it matters, in a real federation on loopback, with both CJs in the same job: site-1 runs the CJ
command given with --cj-command (through fedrun's site launcher), site-2 runs NVFlare's stock
Python worker. It reuses the POC set-up of tests/e2e/nvflare_poc.py.

Measured per CJ:
* RSS idle: VmRSS while the CJ waits (a 3x3 model, the trainer sleeping), the median of samples;
* RSS peak: VmHWM (high-water mark) at the end of the small job;
* launch -> first task: from the CP's "Launch the job in process ID <pid>" log line to the
  server's "sent task assignment to client" line for that client and job;
* per-round overhead: server-side time from sending a client its train task to receiving its
  result, minus the trainer's own sleep (task download, training bookkeeping, result upload);
* a round with a big model (default 256 MiB float32, --big-mib): RSS peak (VmHWM) of each CJ
  and the same per-round time.
CJ processes are found by their command line (job id and `-c site-N`), so the wrapper scripts
that `exec` the real program do not hide it. /proc is polled every 50 ms.

Usage (the fedrun binary path is yours to give; the stock wrapper makes both sides Python):

    .venv/bin/python crates/fedrun-bench/nvflare-job/bench_cj.py --cj-command "$PWD/target/release/fedrun job"
    .venv/bin/python crates/fedrun-bench/nvflare-job/bench_cj.py --cj-command "$PWD/tests/e2e/stock_worker.sh"

Prints a table, then one JSON line with every number. Every process is killed at the end.
"""

import argparse
import atexit
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(REPO, "tests", "e2e"))
import nvflare_poc as poc_mod  # noqa: E402  (the harness is the POC library)

SITES = poc_mod.SITES
TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def log_time(line):
    m = TS.match(line)
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def find_cj_pid(job_id, site):
    """The live process whose command line carries this job id and `-c <site>`."""
    want_job = job_id.encode()
    want_site = b"\0-c\0" + site.encode() + b"\0"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if want_job in cmd and want_site in cmd:
            return int(entry)
    return None


def read_mem(pid):
    """(VmRSS, VmHWM) in KiB, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "r") as f:
            text = f.read()
    except OSError:
        return None
    vals = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, rest = line.split(":", 1)
            vals[key] = int(rest.split()[0])
    if "VmRSS" not in vals:
        return None
    return vals["VmRSS"], vals.get("VmHWM", 0)


class Sampler(threading.Thread):
    """Polls VmRSS/VmHWM of both CJs of one job until stopped."""

    def __init__(self, job_id):
        super().__init__(daemon=True)
        self.job_id = job_id
        self.pids = {}
        self.rss = {s: [] for s in SITES}
        self.hwm = {s: 0 for s in SITES}
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.is_set():
            for site in SITES:
                if site not in self.pids:
                    pid = find_cj_pid(self.job_id, site)
                    if pid:
                        self.pids[site] = pid
                pid = self.pids.get(site)
                if pid:
                    mem = read_mem(pid)
                    if mem:
                        self.rss[site].append(mem[0])
                        self.hwm[site] = max(self.hwm[site], mem[1])
            self.stop_event.wait(0.05)

    def stop(self):
        self.stop_event.set()
        self.join(timeout=5)


def run_job(poc, jobs_dir, name, deadline, **job_kwargs):
    """Submit one job, sample both CJs while it runs, wait for FINISHED:*. Returns (job_id, status,
    sampler)."""
    job_dir = poc_mod.write_job(jobs_dir, name, opt_in_key=None, **job_kwargs)
    job_id = poc.session.submit_job(job_dir)
    sampler = Sampler(job_id)
    sampler.start()
    try:
        def finished():
            status = poc.session.get_job_meta(job_id).get("status", "")
            return status if status.startswith("FINISHED") else None

        status = poc_mod.wait_for(f"job {name}", finished, deadline, poc.all_procs, poll=0.3)
        # Wait for both CJs to exit (the CPs log their RC), so VmHWM covers the whole run.
        poc_mod.wait_for(
            f"both CJs of {name} to exit",
            lambda: all(
                any(m.group("job") == job_id for m in poc_mod.RC_LINE.finditer(poc_mod.read_text(poc.site_logs[s])))
                for s in SITES
            ),
            deadline,
            poc.all_procs,
        )
    finally:
        sampler.stop()
    return job_id, status, sampler


def timings_from_logs(poc, job_id, sampler, sleep_time):
    """Launch->first task and per-round client time for each site, from the logs."""
    server_lines = poc_mod.read_text(poc.server_log).splitlines()
    out = {}
    for site in SITES:
        pid = sampler.pids.get(site)
        launch = None
        if pid:
            for line in poc_mod.read_text(poc.site_logs[site]).splitlines():
                if f"Launch the job in process ID: {pid} " in line:
                    launch = log_time(line)
        sent = {}
        got = {}
        for line in server_lines:
            if f"run={job_id}" not in line:
                continue
            m = re.search(rf"sent task assignment to client\. client_name:{site} task_id:(\S+)", line)
            if m:
                sent[m.group(1)] = log_time(line)
            m = re.search(rf"got result from client {site} for task: name=train, id=(\S+)", line)
            if m:
                got[m.group(1)] = log_time(line)
        first = min(sent.values()) if sent else None
        rounds = [got[t] - sent[t] - sleep_time for t in sent if t in got and sent[t] and got[t]]
        out[site] = {
            "launch_to_first_task_s": round(first - launch, 3) if first and launch else None,
            "round_overhead_s": [round(r, 3) for r in rounds],
        }
    return out


def mib(kib):
    return round(kib / 1024.0, 1) if kib else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cj-command", required=True, help="site-1's CJ command (absolute program + args)")
    ap.add_argument("--mode", choices=("clear", "default"), default="clear")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sleep-time", type=int, default=2, help="trainer sleep per round (s) in the small job")
    ap.add_argument("--big-mib", type=int, default=256, help="size of the big model; 0 skips that job")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()

    scratch = tempfile.mkdtemp(prefix="fedrun-bench-cj-")
    procs = poc_mod.Processes(scratch)
    atexit.register(procs.cleanup)

    def on_signal(signum, _frame):
        procs.cleanup()
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    deadline = time.monotonic() + args.timeout
    report = {"cj_command": args.cj_command, "mode": args.mode, "dir": scratch}
    ok = False
    try:
        with contextlib.redirect_stdout(sys.stderr):
            poc = poc_mod.start_poc(scratch, procs, args.python, args.mode, args.cj_command, {}, None, deadline, {})
            jobs = os.path.join(scratch, "jobs")

            job_id, status, s = run_job(poc, jobs, "small", deadline, sleep_time=args.sleep_time,
                                        np_download_chunk_size=None, num_rounds=args.rounds)
            small = {"job_id": job_id, "status": status, "sites": timings_from_logs(poc, job_id, s, args.sleep_time)}
            for site in SITES:
                small["sites"][site]["rss_idle_mib"] = mib(statistics.median(s.rss[site])) if s.rss[site] else None
                small["sites"][site]["rss_peak_mib"] = mib(s.hwm[site])
            report["small"] = small

            if args.big_mib > 0:
                import numpy as np

                n = int((args.big_mib * 1024 * 1024 / 4) ** 0.5)
                ckpt = os.path.join(scratch, "big_model.npy")
                np.save(ckpt, np.ones((n, n), dtype=np.float32))
                job_id, status, s = run_job(
                    poc, jobs, "big", deadline, sleep_time=0, np_download_chunk_size=None, num_rounds=1,
                    persistor_args={"source_ckpt_file_full_name": ckpt}, train_timeout=600,
                )
                big = {"job_id": job_id, "status": status, "shape": [n, n],
                       "sites": timings_from_logs(poc, job_id, s, 0)}
                for site in SITES:
                    big["sites"][site]["rss_peak_mib"] = mib(s.hwm[site])
                report["big"] = big
            poc_mod.sess_close(poc.session)
        ok = True
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        procs.cleanup()

    def cell(v):
        return "-" if v is None else str(v)

    rows = []
    if "small" in report:
        for key, label in (("rss_idle_mib", "RSS idle (MiB)"), ("rss_peak_mib", "RSS peak, 3x3 model (MiB)"),
                           ("launch_to_first_task_s", "launch -> first task (s)")):
            rows.append((label, *(cell(report["small"]["sites"][s].get(key)) for s in SITES)))
        rows.append(("round overhead, median (s)", *(
            cell(round(statistics.median(report["small"]["sites"][s]["round_overhead_s"]), 3)
                 if report["small"]["sites"][s]["round_overhead_s"] else None) for s in SITES)))
    if "big" in report:
        rows.append((f"RSS peak, {args.big_mib} MiB model (MiB)", *(cell(report["big"]["sites"][s]["rss_peak_mib"]) for s in SITES)))
        rows.append((f"round time, {args.big_mib} MiB model (s)", *(
            cell(report["big"]["sites"][s]["round_overhead_s"][0] if report["big"]["sites"][s]["round_overhead_s"] else None)
            for s in SITES)))
    head = ("metric", "site-1: " + os.path.basename(args.cj_command.split()[0]), "site-2: stock Python CJ")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)] if rows else [10, 10, 10]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    if "error" in report:
        print(f"ERROR: {report['error']} (scratch dir kept: {scratch})")
    print(json.dumps(report))
    if ok and not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
