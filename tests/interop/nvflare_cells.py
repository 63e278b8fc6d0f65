#!/usr/bin/env python3
"""Real NVFlare cells for fedrun's live interop tests (tests/nvflare_interop.rs, tests/nvflare_download.rs).

One process hosts two NVFlare 2.9 cells, as a server-side deployment has them:

    "server"          the server root cell, listening on tcp://127.0.0.1:<port> (fedrun connects here)
    "server.<job>"    the server job cell, a child of "server"

NVFlare delivers messages between cells of one process directly, so every frame on the wire is
between fedrun and the root cell, which forwards "server.<job>" traffic as a server parent does.
The job cell answers: task/echo (echoes the Shareable), aux_communication/interop_echo,
server_command/get_task (a task with an inline numpy array), aux_communication/np_sum,
server_command/submit_update (checks a byte pattern), aux_communication/interop_aux (the engine's
aux request), and takes fire-and-forget messages on task/note and aux_communication/big_note.

The Rust test drives this script: it writes one JSON command per line to stdin and reads one JSON
event per line from stdout. Everything NVFlare logs goes to stderr. Events:

    {"event": "ready", ...}                      both cells are up (printed once, first)
    {"event": "peer_state", "peer", "state"}     an endpoint of the root cell changed state
    {"event": "bye_received", "origin"}          the root cell got cellnet.channel/bye
    {"event": "ping_received"|"pong_received", "peer"}   SFM heartbeat frames seen by the root cell
    {"event": "request", "cell", "channel", "topic", "origin", "via", "payload"}
                                                 a callback of ours ran ("via": "core" or "stream")
    {"event": "done", "id", ...}                 a command finished
    {"event": "ref_created", "dot", "fqcn", "ref_id", "tampered"}
                                                 NVFlare's FOBS turned a payload's arrays into a download ref
    {"event": "download_served", "origin", "ref_id", "rc", "status", "items", ...}
                                                 the job cell's download service answered a request
    {"event": "arrays_received", "cell", "origin", "arrays"}
                                                 aux_communication/np_check got a Shareable of arrays
    {"event": "failed", "id", "error"}           a command raised

Commands ({"cmd": ..., "id": ...}):

    ask        the job cell sends a request to fedrun ("target", "channel", "topic", "payload")
    ask_large  the same with a Shareable {"blob": <"size" bytes of a known pattern>}
    fire       the job cell sends a fire-and-forget message
    aux        the job cell sends an aux request as NVFlare's aux runner does (__topic__, __peer_props__)
    ping       the root cell sends an SFM PING on its connection to "peer"
    ask_arrays the job cell sends a request whose Shareable is the test arrays (see make_arrays)
    tamper     "mode": null, "unknown_ref" or "unreachable": the next download refs NVFlare writes
               name a ref id nobody serves, or a producer cell that does not exist
    quit       stop both cells and exit

Bounded: a watchdog ends the process after --watchdog seconds, and the end of stdin ends it too.
Numpy arrays: by default NVFlare is told to send them inline (np_download_chunk_size = 0). With
--np-download it keeps its default (2 MiB): every array of a payload leaves as a download reference
that the receiver pulls from the job cell's download service, and arrays received as references
are pulled from their producer (fedrun) while NVFlare decodes the message.

Loopback only. Usage: nvflare_cells.py --port PORT --job JOB [--watchdog SECONDS] [--np-download]
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
    """A JSON-friendly view of a decoded payload (bytes are summarised by length and byte sum)."""
    import numpy as np

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        b = bytes(obj)
        return {"$bytes_len": len(b), "$bytes_sum": sum(b)}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": {"dtype": str(obj.dtype), "shape": list(obj.shape), "values": obj.ravel().tolist()}}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"$tuple": [plain(v) for v in obj]}
    if isinstance(obj, (list, set)):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    return {"$repr": repr(obj)}


def pattern(size):
    """The bytes of the large-message step: byte i is (i * 7 + 3) mod 251."""
    unit = bytes((i * 7 + 3) % 251 for i in range(251))
    return (unit * (size // 251 + 1))[:size]


def make_arrays():
    """The arrays of the download test; tests/nvflare_download.rs builds the same ones.

    v(i) = ((i * 7 + 3) mod 1001) / 8 - 60 is exact in float32 and float64.
    """
    import numpy as np

    def v(n):
        i = np.arange(n, dtype=np.int64)
        return ((i * 7 + 3) % 1001) * 0.125 - 60.0

    return {
        # 3 MiB: above the 2 MiB chunk size, so it is a batch of its own
        "big": v(768 * 1024).astype(np.float32).reshape(768, 1024),
        "mid": (v(1000) + 0.5).astype(np.float32),
        "small": (v(6) + 1.0 / 3.0).reshape(3, 2),  # float64
    }


def array_summary(arr):
    """What the event stream says about a received array (not its values: they can be megabytes)."""
    import numpy as np

    if not isinstance(arr, np.ndarray):
        return {"type": type(arr).__name__, "repr": repr(arr)[:200]}
    return {
        "type": "ndarray",
        "dtype": str(arr.dtype),
        "shape": list(arr.shape),
        "sum": float(arr.astype(np.float64).sum()),
        "first": arr.ravel()[:3].tolist(),
        "last": arr.ravel()[-1:].tolist(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--watchdog", type=float, default=55.0)
    ap.add_argument("--np-download", action="store_true", help="keep NVFlare's default numpy download refs")
    args = ap.parse_args()
    # read by NVFlare's config service from the env
    if args.np_download:
        os.environ.pop("NVFLARE_NP_DOWNLOAD_CHUNK_SIZE", None)  # NVFlare's default, 2 MiB
    else:
        os.environ.setdefault("NVFLARE_NP_DOWNLOAD_CHUNK_SIZE", "0")  # arrays inline (FOBS "native")

    # NVFlare's own output must never reach the event stream.
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def watchdog():
        emit("watchdog", after=args.watchdog)
        os._exit(3)

    timer = threading.Timer(args.watchdog, watchdog)
    timer.daemon = True
    timer.start()

    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
    from nvflare.apis.utils.decomposers import flare_decomposers
    from nvflare.app_common.decomposers import numpy_decomposers
    from nvflare.fuel.f3.cellnet.cell import Cell, _is_stream_channel
    from nvflare.fuel.f3.endpoint import EndpointMonitor
    from nvflare.fuel.f3.message import Message
    from nvflare.fuel.f3.sfm.constants import Types
    from nvflare.fuel.f3.sfm.prefix import Prefix
    import numpy as np

    from nvflare.fuel.f3.streaming.download_service import DownloadService
    from nvflare.fuel.utils.fobs.datum import Datum
    from nvflare.fuel.utils.fobs.decomposers.via_downloader import ViaDownloaderDecomposer

    flare_decomposers.register()
    numpy_decomposers.register()

    # ---- observation (and, on command, corruption) of NVFlare's download refs
    tamper = {"mode": None}
    create_datum = ViaDownloaderDecomposer._create_datum

    def spy_create_datum(self, fobs_ctx):
        datum = create_datum(self, fobs_ctx)
        ref = json.loads(datum.value)
        mode = tamper["mode"]
        if mode == "unknown_ref":
            ref["ref_id"] = "00000000-0000-4000-8000-000000000000"
        elif mode == "unreachable":
            ref["fqcn"] = "server.nowhere"
        emit("ref_created", dot=datum.dot, fqcn=ref["fqcn"], ref_id=ref["ref_id"], tampered=mode)
        if mode:
            datum = Datum(datum.datum_type, json.dumps(ref), datum.dot)
        return datum

    ViaDownloaderDecomposer._create_datum = spy_create_datum

    # registered on a cell when its first transaction starts: patched before any can start
    handle_download = DownloadService._handle_download

    def spy_handle_download(request):
        reply = handle_download(request)
        req = request.payload if isinstance(request.payload, dict) else {}
        body = reply.payload if isinstance(reply.payload, dict) else {}
        data = body.get("data") if isinstance(body.get("data"), list) else []
        emit(
            "download_served",
            origin=request.get_header("cn__origin"),
            ref_id=req.get("ref_id"),
            state=req.get("state"),
            confirm=req.get("confirm"),
            cancel=req.get("cancel"),
            rc=reply.get_header("cn__return_code"),
            status=body.get("status"),
            items=len(data),
            item_bytes=[len(x) for x in data],
        )
        return reply

    DownloadService._handle_download = staticmethod(spy_handle_download)

    job_fqcn = f"server.{args.job}"
    root_url = f"tcp://127.0.0.1:{args.port}"
    root = Cell(fqcn="server", root_url=root_url, secure=False, credentials={}, create_internal_listener=True)

    # ---- observation of the root cell: endpoints, bye, heartbeat frames
    class Monitor(EndpointMonitor):
        def state_change(self, endpoint):
            emit("peer_state", cell="server", peer=endpoint.name, state=endpoint.state.name)

    root.core_cell.communicator.register_monitor(Monitor())

    def interceptor(message: Message):
        if message.get_header("cn__channel") == "cellnet.channel" and message.get_header("cn__topic") == "bye":
            emit("bye_received", cell="server", origin=message.get_header("cn__origin"))
        return None  # let the message go on

    root.core_cell.set_message_interceptor(interceptor)

    conn_manager = root.core_cell.communicator.conn_manager
    process_frame = conn_manager.process_frame_task

    def peer_of(sfm_conn):
        ep = getattr(sfm_conn, "sfm_endpoint", None)
        return ep.endpoint.name if ep else None

    def spy(sfm_conn, frame):
        try:
            kind = Prefix.from_bytes(frame).type
            if kind == Types.PING:
                emit("ping_received", cell="server", peer=peer_of(sfm_conn))
            elif kind == Types.PONG:
                emit("pong_received", cell="server", peer=peer_of(sfm_conn))
        except Exception as e:  # observation only: never disturb the connection
            emit("spy_error", error=repr(e))
        return process_frame(sfm_conn, frame)

    conn_manager.process_frame_task = spy

    root.start()
    internal_url = root.get_internal_listener_url()

    job = Cell(fqcn=job_fqcn, root_url=root_url, secure=False, credentials={}, parent_url=internal_url)

    # ---- callbacks of the job cell (what fedrun calls)
    def via(request):
        return "stream" if request.get_header("sm__ri") else "core"

    def seen(request):
        emit(
            "request",
            cell=job_fqcn,
            channel=request.get_header("cn__channel"),
            topic=request.get_header("cn__topic"),
            origin=request.get_header("cn__origin"),
            via=via(request),
            payload=plain(request.payload),
        )

    def ok(payload):
        # a reply that travels as a stream gets no default return code: always set it
        return Message({"cn__return_code": "ok"}, payload)

    def echo(request: Message):
        seen(request)
        return ok(request.payload)

    def aux_echo(request: Message):
        seen(request)
        reply = make_reply(ReturnCode.OK)
        reply["echo"] = request.payload.get("x") if isinstance(request.payload, dict) else None
        reply["via"] = via(request)
        return ok(reply)

    def get_task(request: Message):
        seen(request)
        task = Shareable()
        task.set_header("task_name", "train")
        task.set_header("task_id", "tid-0001")
        task.add_cookie("task_id", "tid-0001")
        task["weights"] = np.array([0.5, -1.25, 3.0], dtype=np.float32)
        return ok(task)

    def np_sum(request: Message):
        seen(request)
        arr = request.payload.get("w") if isinstance(request.payload, dict) else None
        reply = make_reply(ReturnCode.OK)
        reply["got_type"] = type(arr).__name__
        reply["got_sum"] = float(arr.sum()) if isinstance(arr, np.ndarray) else None
        reply["w2"] = np.array([[1, 2], [3, 4]], dtype=np.int32)
        return ok(reply)

    def submit_update(request: Message):
        seen(request)
        blob = request.payload.get("blob") if isinstance(request.payload, dict) else None
        blob = bytes(blob) if blob is not None else b""
        reply = make_reply(ReturnCode.OK)
        reply["received"] = len(blob)
        reply["pattern_ok"] = blob == pattern(len(blob))
        return ok(reply)

    def note(request: Message):
        emit(
            "ff_received",
            cell=job_fqcn,
            channel=request.get_header("cn__channel"),
            topic=request.get_header("cn__topic"),
            origin=request.get_header("cn__origin"),
            reply_expected=request.get_header("cn__reply_expected"),
            payload=plain(request.payload),
        )
        return None

    def aux_from_engine(request: Message):
        seen(request)
        payload = request.payload if isinstance(request.payload, Shareable) else Shareable()
        reply = make_reply(ReturnCode.OK)
        reply["answer"] = "from the python server job"
        reply["seen_topic"] = payload.get_header(ReservedHeaderKey.TOPIC)
        reply["seen_peer_props"] = plain(payload.get_header(ReservedHeaderKey.PEER_PROPS))
        reply["seen_x"] = payload.get("x")
        return ok(reply)

    job.register_request_cb(channel="task", topic="echo", cb=echo)
    job.register_request_cb(channel="task", topic="note", cb=note)
    job.register_request_cb(channel="aux_communication", topic="big_note", cb=note)
    job.register_request_cb(channel="aux_communication", topic="interop_echo", cb=aux_echo)
    job.register_request_cb(channel="aux_communication", topic="np_sum", cb=np_sum)
    job.register_request_cb(channel="aux_communication", topic="interop_aux", cb=aux_from_engine)
    job.register_request_cb(channel="server_command", topic="get_task", cb=get_task)
    job.register_request_cb(channel="server_command", topic="submit_update", cb=submit_update)

    def arrays_shareable():
        arrays = make_arrays()
        s = Shareable()
        s.set_header("task_name", "train")
        s["weights"] = {"big": arrays["big"], "mid": arrays["mid"]}
        s["small"] = arrays["small"]
        s["round"] = 7
        return s

    def np_check(request: Message):
        # NVFlare's FOBS has already pulled any referenced arrays while decoding
        payload = request.payload if isinstance(request.payload, dict) else {}
        weights = payload.get("weights") if isinstance(payload.get("weights"), dict) else {}
        got = {"big": weights.get("big"), "mid": weights.get("mid"), "small": payload.get("small")}
        expected = make_arrays()
        summary = {}
        for name, arr in got.items():
            s = array_summary(arr)
            want = expected[name]
            s["equal"] = bool(isinstance(arr, np.ndarray) and arr.dtype == want.dtype and np.array_equal(arr, want))
            summary[name] = s
        emit("arrays_received", cell=job_fqcn, origin=request.get_header("cn__origin"), arrays=summary)
        reply = make_reply(ReturnCode.OK)
        reply["all_equal"] = all(s["equal"] for s in summary.values())
        reply["round"] = payload.get("round")
        # an array back: the reply leaves with a download ref of its own
        reply["echo_small"] = got["small"] if isinstance(got["small"], np.ndarray) else None
        return ok(reply)

    def get_arrays(request: Message):
        seen(request)
        return ok(arrays_shareable())

    job.register_request_cb(channel="aux_communication", topic="np_check", cb=np_check)
    job.register_request_cb(channel="aux_communication", topic="get_arrays", cb=get_arrays)
    job.start()

    deadline = time.time() + 20
    while not job.is_cell_connected("server") and time.time() < deadline:
        time.sleep(0.05)
    if not job.is_cell_connected("server"):
        emit("failed", id=None, error="job cell did not connect to the root cell")
        os._exit(2)
    emit("ready", root="server", job=job_fqcn, url=root_url, pid=os.getpid())

    # ---- commands (what fedrun is called with)
    def reply_fields(reply: Message):
        return {
            "rc": reply.get_header("cn__return_code"),
            "error": reply.get_header("cn__error"),
            "payload": plain(reply.payload),
        }

    def ask(cmd, payload):
        channel = cmd["channel"]
        reply = job.send_request(
            channel=channel,
            topic=cmd["topic"],
            target=cmd["target"],
            request=Message(None, payload),
            timeout=float(cmd.get("timeout", 10)),
        )
        return dict(reply_fields(reply), streamed=_is_stream_channel(channel))

    def run(cmd):
        kind = cmd.get("cmd")
        if kind == "ask":
            return ask(cmd, Shareable(cmd.get("payload") or {}))
        if kind == "ask_large":
            payload = Shareable()
            payload["blob"] = pattern(int(cmd["size"]))
            return ask(cmd, payload)
        if kind == "fire":
            channel = cmd["channel"]
            result = job.fire_and_forget(
                channel=channel, topic=cmd["topic"], targets=cmd["target"],
                message=Message(None, Shareable(cmd.get("payload") or {})),
            )
            return {"result": plain(result), "streamed": _is_stream_channel(channel)}
        if kind == "aux":
            # what NVFlare's aux runner puts into every aux request
            req = Shareable(cmd.get("payload") or {})
            req.set_header(ReservedHeaderKey.TOPIC, cmd["topic"])
            req.set_header(
                ReservedHeaderKey.PEER_PROPS,
                {"__identity_name__": "server", "__run_num__": args.job, "__fqsn__": "server", "__is_leaf__": True},
            )
            reply = job.send_request(
                channel="aux_communication", topic=cmd["topic"], target=cmd["target"],
                request=Message(None, req), timeout=float(cmd.get("timeout", 10)),
            )
            return dict(reply_fields(reply), streamed=True)
        if kind == "ask_arrays":
            return ask(cmd, arrays_shareable())
        if kind == "tamper":
            tamper["mode"] = cmd.get("mode")
            return {"mode": tamper["mode"]}
        if kind == "ping":
            sent = 0
            for sfm_conn in list(conn_manager.sfm_conns.values()):
                if peer_of(sfm_conn) == cmd["peer"]:
                    sfm_conn.send_heartbeat(Types.PING)
                    sent += 1
            return {"pings_sent": sent}
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

    # quit, or stdin closed (the test is gone)
    job.stop()
    root.stop()
    emit("stopped")
    os._exit(0)


if __name__ == "__main__":
    main()
