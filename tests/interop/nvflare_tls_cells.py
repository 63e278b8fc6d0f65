"""Real NVFlare 2.9 cells over TLS/mTLS with a provisioned startup kit, for tests/nvflare_tls.rs.

Two roles, each one process:

  server  --kit DIR --port PORT [--security mtls|tls]
      NVFlare's server root cell "server" listening on stcp://127.0.0.1:PORT with the kit's
      rootCA.pem, server.crt and server.key (what the provisioned server's cell uses). It
      answers channel "test" topic "echo" with "echo from server: " + the request's bytes,
      reports every request as an event, and runs until stdin ends or the watchdog fires.

  client  --kit DIR --url URL --site SITE --job JOB --server-identity CN [--security mtls|tls]
      NVFlare's client job cell "SITE.JOB" connecting to URL with the site kit's rootCA.pem,
      client.crt and client.key, binding "server" to CN as a client job process does
      (fed_client.json servers[0].identity). Once connected it sends "test"/"echo" to "server"
      and reports the reply, then exits.

Each prints one JSON object per line on stdout ("ready", "request", "connected", "reply",
"not_connected", "watchdog"); NVFlare's own logging goes to stderr. Loopback only; every wait
is bounded and a watchdog ends the process after --watchdog seconds.
"""

import argparse
import json
import logging
import os
import sys
import threading
import time


def emit(event, **fields):
    fields["event"] = event
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def start_watchdog(seconds):
    def fire():
        emit("watchdog", after=seconds)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def wait_connected(cell, name, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if cell.is_cell_connected(name):
            return True
        time.sleep(0.05)
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["server", "client"])
    ap.add_argument("--kit", required=True)
    ap.add_argument("--port", type=int)
    ap.add_argument("--url")
    ap.add_argument("--site")
    ap.add_argument("--job")
    ap.add_argument("--server-identity", default="server")
    ap.add_argument("--security", default="mtls")
    ap.add_argument("--watchdog", type=float, default=55.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    start_watchdog(args.watchdog)

    from nvflare.fuel.f3.cellnet.cell import Cell
    from nvflare.fuel.f3.cellnet.defs import MessageHeaderKey, ReturnCode
    from nvflare.fuel.f3.message import Message

    kit = args.kit
    if args.role == "server":
        cell = Cell(
            fqcn="server",
            root_url=f"stcp://127.0.0.1:{args.port}",
            secure=True,
            credentials={
                "ca_cert": os.path.join(kit, "rootCA.pem"),
                "server_cert": os.path.join(kit, "server.crt"),
                "server_key": os.path.join(kit, "server.key"),
                "connection_security": args.security,
            },
            create_internal_listener=False,
        )

        def echo(request: Message):
            origin = request.get_header(MessageHeaderKey.ORIGIN)
            emit("request", origin=origin)
            body = bytes(request.payload or b"")
            return Message({MessageHeaderKey.RETURN_CODE: ReturnCode.OK}, b"echo from server: " + body)

        cell.register_request_cb(channel="test", topic="echo", cb=echo)
        cell.start()
        emit("ready", port=args.port)
        # runs until the test closes stdin
        for _ in sys.stdin:
            pass
        cell.stop()
        emit("stopped")
        os._exit(0)

    fqcn = f"{args.site}.{args.job}"
    creds = {
        "ca_cert": os.path.join(kit, "rootCA.pem"),
        "connection_security": args.security,
    }
    if args.security == "mtls":
        creds["client_cert"] = os.path.join(kit, "client.crt")
        creds["client_key"] = os.path.join(kit, "client.key")
    # what a client job process builds (FederatedClientBase._create_cell)
    cell = Cell(
        fqcn=fqcn,
        root_url=args.url,
        secure=True,
        credentials=creds,
        create_internal_listener=False,
        auth_identity=args.site,
        auth_identity_map={args.site: args.site, "server": args.server_identity},
    )
    cell.start()
    if not wait_connected(cell, "server", 20):
        emit("not_connected")
        os._exit(1)
    emit("connected", fqcn=fqcn)
    reply = cell.send_request(
        channel="test", topic="echo", target="server", request=Message(None, b"hello over mtls"), timeout=15
    )
    payload = reply.payload
    emit(
        "reply",
        rc=reply.get_header(MessageHeaderKey.RETURN_CODE),
        payload=bytes(payload).decode("utf-8", "replace") if isinstance(payload, (bytes, bytearray, memoryview)) else repr(payload),
    )
    cell.stop()
    os._exit(0)


if __name__ == "__main__":
    main()
