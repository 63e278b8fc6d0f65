#!/bin/sh
# The stock NVFlare client job, started through fedrun's launcher: it receives the arguments the
# launcher gives `fedrun job` and execs NVFlare's own worker with them (same pid, so the CP's
# process handle and abort semantics are unchanged). Used to validate tests/e2e/nvflare_poc.py
# while `fedrun job` is not available, and as the Python baseline of the CJ benchmark.
# FEDRUN_CP_PYTHON is set by the launcher to the CP's interpreter.
exec "${FEDRUN_CP_PYTHON:?FEDRUN_CP_PYTHON not set (not started by fedrun_launcher)}" \
    -m nvflare.private.fed.app.client.worker_process "$@"
