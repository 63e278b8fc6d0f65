#!/usr/bin/env python3
"""Real NVFlare 2.9 cells with credentials, for fedrun's live secure-message test (tests/nvflare_secure.rs).

One process hosts two NVFlare cells, as a server-side deployment has them:

    "server"          the server root cell, listening on clear tcp://127.0.0.1:<port>, without
                      credentials: it only relays (secure messages do not need TLS links)
    "server.<job>"    the server job cell, a child of "server", with the server's credentials of
                      the provisioned kit (--kit, the "startup" folder of the server) in mTLS
                      configuration: certificates it learns are bound to the cell names

The job cell answers, echoing what it got and whether it came as a secure message:

    aux_communication/secure_echo   a stream channel: requests and replies are streamed, each chunk
                                    its own envelope (what NVFlare's aux runner uses)
    task/secure_bytes               the core path with a bytes payload (NVFlare 2.9 cannot encrypt a
                                    FOBS payload on the core path: the reply is bytes too)

The Rust test writes one JSON command per line to stdin and reads one JSON event per line from
stdout (NVFlare's own output goes to stderr). Events:

    {"event": "ready", "job", ...}                        both cells are up (first event)
    {"event": "request", "channel", "topic", "origin", "secure", "payload"}
                                                          a handler of the job cell ran
    {"event": "cipher", "op": "encrypt"|"decrypt", "clear_len"}
                                                          NVFlare's credential manager sealed/opened an envelope
    {"event": "done", "id", "rc", "error", "payload"}     a command finished
    {"event": "failed", "id", "error"}                    a command raised

Commands ({"cmd": ..., "id": ...}):

    ask_secure        the job cell sends a secure streamed aux request to "target" with {"x": ..., "blob": <bytes>}
    ask_secure_bytes  the job cell sends a secure core request with bytes "text" to "target"
    quit              stop both cells and exit

Bounded: a watchdog ends the process after --watchdog seconds, and the end of stdin ends it too.
Loopback only. Usage: nvflare_secure_cells.py --port PORT --job JOB --kit SERVER_STARTUP_DIR [--watchdog S]
"""

import argparse
import json
import logging
import os
import sys
import threading
import time

_OUT = sys.stdout
_OUT_LOCK = threading.Lock()


def emit(event, **fields):
    """Prints one event as one JSON line on the real stdout."""
    fields["event"] = event
    fields["t"] = round(time.time(), 3)
    line = json.dumps(fields, default=repr)
    with _OUT_LOCK:
        _OUT.write(line + "\n")
        _OUT.flush()


def plain(obj):
    """A JSON-friendly view of a payload (bytes as text when they are UTF-8, else by length)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        b = bytes(obj)
        try:
            return {"$text": b.decode("utf-8")}
        except UnicodeDecodeError:
            return {"$bytes_len": len(b), "$bytes_sum": sum(b)}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    return {"$repr": repr(obj)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--kit", required=True, help="the server's startup folder of a provisioned kit")
    ap.add_argument("--watchdog", type=float, default=55.0)
    args = ap.parse_args()

    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def watchdog():
        emit("watchdog", after=args.watchdog)
        os._exit(3)

    timer = threading.Timer(args.watchdog, watchdog)
    timer.daemon = True
    timer.start()

    import nvflare.fuel.f3.cellnet.credential_manager as cm
    from nvflare.fuel.f3.cellnet.cell import Cell
    from nvflare.fuel.f3.message import Message

    # ---- observation: every envelope NVFlare seals or opens
    encrypt, decrypt = cm.CredentialManager.encrypt, cm.CredentialManager.decrypt

    def spy_encrypt(self, target_cert, payload):
        out = encrypt(self, target_cert, payload)
        emit("cipher", op="encrypt", clear_len=len(payload))
        return out

    def spy_decrypt(self, origin_cert, cipher):
        out = decrypt(self, origin_cert, cipher)
        emit("cipher", op="decrypt", clear_len=len(out))
        return out

    cm.CredentialManager.encrypt = spy_encrypt
    cm.CredentialManager.decrypt = spy_decrypt

    root_url = f"tcp://127.0.0.1:{args.port}"
    root = Cell(fqcn="server", root_url=root_url, secure=False, credentials={}, create_internal_listener=True)
    root.start()
    internal_url = root.get_internal_listener_url()

    job_fqcn = f"server.{args.job}"
    creds = {
        "ca_cert": os.path.join(args.kit, "rootCA.pem"),
        "server_cert": os.path.join(args.kit, "server.crt"),
        "server_key": os.path.join(args.kit, "server.key"),
        "connection_security": "mtls",
    }
    # the job cell's only link is the clear internal one to the root; "mtls" binds exchanged
    # certificates to cell names
    job = Cell(fqcn=job_fqcn, root_url=root_url, secure=True, credentials=creds, parent_url=internal_url)

    def seen(request):
        emit(
            "request",
            channel=request.get_header("cn__channel"),
            topic=request.get_header("cn__topic"),
            origin=request.get_header("cn__origin"),
            secure=request.get_header("cn__secure"),
            payload=plain(request.payload),
        )

    def secure_echo(request: Message):
        seen(request)
        got = request.payload if isinstance(request.payload, dict) else {}
        blob = got.get("blob")
        reply = {
            "echo_x": got.get("x"),
            "blob_len": len(blob) if blob is not None else None,
            "req_secure": request.get_header("cn__secure"),
            "from": job_fqcn,
        }
        # a reply that travels as a stream gets no default return code: always set it
        return Message({"cn__return_code": "ok"}, reply)

    def secure_bytes(request: Message):
        seen(request)
        return Message({"cn__return_code": "ok"}, b"echo from " + job_fqcn.encode() + b": " + bytes(request.payload))

    job.register_request_cb(channel="aux_communication", topic="secure_echo", cb=secure_echo)
    job.register_request_cb(channel="task", topic="secure_bytes", cb=secure_bytes)
    job.start()

    deadline = time.time() + 20
    while not job.is_cell_connected("server") and time.time() < deadline:
        time.sleep(0.05)
    if not job.is_cell_connected("server"):
        emit("failed", id=None, error="job cell did not connect to the root cell")
        os._exit(2)
    emit("ready", root="server", job=job_fqcn, url=root_url, pid=os.getpid())

    def reply_fields(reply: Message):
        return {
            "rc": reply.get_header("cn__return_code"),
            "error": reply.get_header("cn__error"),
            "secure": reply.get_header("cn__secure"),
            "payload": plain(reply.payload),
        }

    def run(cmd):
        kind = cmd.get("cmd")
        timeout = float(cmd.get("timeout", 10))
        if kind == "ask_secure":
            payload = {"x": cmd.get("x"), "blob": bytes(range(256)) * int(cmd.get("blob_kib", 1)) * 4}
            reply = job.send_request(
                channel="aux_communication", topic="secure_echo", target=cmd["target"],
                request=Message(None, payload), timeout=timeout, secure=True,
            )
            return reply_fields(reply)
        if kind == "ask_secure_bytes":
            reply = job.send_request(
                channel="task", topic="secure_bytes", target=cmd["target"],
                request=Message(None, cmd["text"].encode()), timeout=timeout, secure=True,
            )
            return reply_fields(reply)
        raise ValueError(f"unknown command {kind!r}")

    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
        except ValueError as e:
            emit("failed", id=None, error=f"bad command line: {e}")
            continue
        if cmd.get("cmd") == "quit":
            break
        try:
            emit("done", id=cmd.get("id"), **run(cmd))
        except Exception as e:
            emit("failed", id=cmd.get("id"), error=repr(e))

    job.stop()
    root.stop()
    emit("stopped")
    os._exit(0)


if __name__ == "__main__":
    main()
