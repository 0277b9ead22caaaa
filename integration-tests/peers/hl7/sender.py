"""An MLLP sender nobody on the team wrote: python-hl7's `hl7.client.MLLPClient` (PyPI `hl7`)
sends HL7 v2 messages and reads each acknowledgement, which python-hl7 parses.

Usage: python sender.py --host 127.0.0.1 --port PORT [--timeout SECONDS] [--raw]
                        [--new-connection] [FILE ...]

Messages come from the FILEs (or stdin when there is none, or for `-`): one message per file,
or several in a file, separated by blank lines or each starting at its MSH segment. A UTF-8 BOM
is removed and every line break (CRLF, LF, CR) becomes the segment terminator CR; each message
ends with one CR. With --raw each file (or stdin) is sent as one frame exactly as it is read.

The messages go, in order, over one connection (original mode: the ACK is read before the next
message is sent); when the peer closed it, the next message goes over a new one (and when the
reused connection turns out reset before any answer came, the peer having closed it before the
message arrived, the message is sent once more on a new connection). With --new-connection
every message gets its own connection.

Prints one JSON line per message, flushed at once:
  {"n": 0, "sent_control_id": "...", "sent_type": "ORU^R01", "status": "ack",
   "ack": "AA", "control_id": "<MSA-2>", "text": "<MSA-3>", "err": "<ERR text>" or null,
   "err_segments": ["ERR|..."], "ack_type": "ACK^R01^ACK", "raw": "<the ACK, CR kept>"}
or, when no acknowledgement came:
  {"n": 0, ..., "status": "closed" | "timeout" | "connect_failed" | "unreadable", "detail": "..."}
(`unreadable`: bytes came that python-hl7 cannot parse as a message with an MSA segment; `raw`
holds them). `"resent_after_reset": true` is added when the message was sent again on a new
connection because the reused one was reset before any answer (see below). Never waits longer than --timeout for a connection or an ACK. Exit code 0 when
every message was sent and answered (whatever the code), 1 otherwise.
"""
import argparse
import json
import re
import select
import socket
import sys

import hl7
from hl7.client import MLLPClient

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"


def normalise(text):
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\r").replace("\n", "\r")


def _is_msh(segment):
    return segment.startswith("MSH") and len(segment) > 3 and not segment[3].isalnum()


def split_messages(text):
    """Messages in a normalised text: blank lines separate messages, and so does each MSH."""
    messages = []
    for block in re.split(r"\r{2,}", text):
        segments = [s for s in block.split("\r") if s.strip() != ""]
        current = []
        for seg in segments:
            if _is_msh(seg) and any(_is_msh(s) for s in current):
                messages.append(current)
                current = []
            current.append(seg)
        if current:
            messages.append(current)
    return ["\r".join(m) + "\r" for m in messages]


def header(message):
    """(MSH-10, MSH-9) read loosely from a message's first segment; None where unreadable."""
    first = message.split("\r", 1)[0]
    if not _is_msh(first) or len(first) < 5:
        return None, None
    fs = first[3]
    fields = ["MSH", fs] + first[4:].split(fs)
    comp = fields[2][0] if fields[2] else "^"
    cid = fields[10].split(comp)[0] if len(fields) > 10 else None
    typ = fields[9] if len(fields) > 9 else None
    return cid or None, typ or None


def read_inputs(paths, raw):
    sources = paths or ["-"]
    out = []
    for path in sources:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
        if raw:
            out.append(data)
            continue
        text = data.decode("utf-8", errors="surrogateescape")
        for m in split_messages(normalise(text)):
            out.append(m.encode("utf-8", errors="surrogateescape"))
    return out


def _str(x):
    s = str(x) if x is not None else ""
    return s


def describe_ack(raw):
    """The answer's fields, parsed with python-hl7."""
    framed = raw
    if framed.startswith(SB):
        framed = framed[1:]
    if framed.endswith(EB + CR):
        framed = framed[:-2]
    text = framed.decode("utf-8", errors="replace")
    out = {"raw": text}
    try:
        msg = hl7.parse(text)
        msa = msg.segment("MSA")
    except Exception as e:  # noqa: BLE001 - anything python-hl7 refuses
        out.update({"status": "unreadable", "detail": "%s: %s" % (type(e).__name__, e)})
        return out
    code = _str(msa(1)) if len(msa) > 1 else ""
    cid = _str(msa(2)) if len(msa) > 2 else ""
    msa_text = _str(msa(3)) if len(msa) > 3 else ""
    errs = [seg for seg in msg if _str(seg[0]) == "ERR"]
    err_text = None
    if errs:
        e = errs[0]
        # v2.5+: ERR-8 user message, else ERR-3 error code (text component), else ERR-1 (v2.3
        # and v2.4: error code and location, its 4th component the code's text); else the
        # segment itself.
        candidates = []
        for n in (8, 3):
            if len(e) > n and _str(e(n)):
                candidates.append(_str(e(n)))
        if len(e) > 1 and _str(e(1)):
            candidates.append(_str(e(1)))
        err_text = candidates[0] if candidates else _str(e)
    try:
        ack_type = _str(msg.segment("MSH")(9))
    except Exception:  # noqa: BLE001
        ack_type = None
    out.update({
        "status": "ack",
        "ack": code,
        "control_id": cid,
        "text": msa_text,
        "err": err_text,
        "err_segments": [_str(e) for e in errs],
        "ack_type": ack_type,
    })
    return out


def receive_rest(sock, first, timeout):
    """python-hl7's MLLPClient reads once (4096 bytes): read on until the frame's end."""
    data = first
    sock.settimeout(timeout)
    while not (data.endswith(EB + CR) or data.endswith(EB)):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def peer_closed(sock):
    """Whether the peer has closed the connection (an EOF waits to be read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=10, help="seconds, per connect and per ACK")
    p.add_argument("--raw", action="store_true", help="send each input as one frame, unchanged")
    p.add_argument("--new-connection", action="store_true", help="one connection per message")
    p.add_argument("files", nargs="*")
    args = p.parse_args()

    # MLLPClient connects in its constructor, with no timeout of its own: the default timeout
    # applies to its socket (connect and every recv).
    socket.setdefaulttimeout(args.timeout)
    messages = read_inputs(args.files, args.raw)
    client = None
    all_answered = True
    for n, message in enumerate(messages):
        text = message.decode("utf-8", errors="replace")
        cid, typ = header(normalise(text))
        result = {"n": n, "sent_control_id": cid, "sent_type": typ}
        # A connection that already carried an exchange may have been closed by a peer that
        # closes after each ACK (hl7apy's server does). Seen before sending: reconnect. Seen
        # only as a reset while waiting for the ACK (the peer's socket was gone when the message
        # arrived, so it read nothing): send once more on a new connection, and say so.
        reused = client is not None
        for attempt in (0, 1):
            try:
                if client is not None and peer_closed(client.socket):
                    client.close()
                    client = None
                    reused = False
                if client is None:
                    client = MLLPClient(args.host, args.port)
                first = client.send_message(message)
                if not first:
                    result.update({"status": "closed", "detail": "connection closed, no ACK"})
                    client.close()
                    client = None
                else:
                    raw = receive_rest(client.socket, first, args.timeout)
                    result.update(describe_ack(raw))
            except socket.timeout:
                result.update({"status": "timeout", "detail": "no ACK within %ss" % args.timeout})
                if client is not None:
                    client.close()
                client = None
            except (ConnectionResetError, BrokenPipeError) as e:
                if client is not None:
                    client.close()
                client = None
                if reused and attempt == 0:
                    result["resent_after_reset"] = True
                    reused = False
                    continue
                result.update({"status": "closed", "detail": "%s: %s" % (type(e).__name__, e)})
            except OSError as e:
                status = "connect_failed" if client is None else "closed"
                result.update({"status": status, "detail": "%s: %s" % (type(e).__name__, e)})
                if client is not None:
                    client.close()
                client = None
            break
        if result.get("status") != "ack":
            all_answered = False
        emit(result)
        if args.new_connection and client is not None:
            client.close()
            client = None
    if client is not None:
        client.close()
    sys.exit(0 if all_answered else 1)


if __name__ == "__main__":
    main()
