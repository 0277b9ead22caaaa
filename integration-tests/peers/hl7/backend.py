"""An MLLP backend nobody on the team wrote: hl7apy's `MLLPServer` (PyPI `hl7apy`) answering
every HL7 v2 message with an original-mode acknowledgement built by hl7apy.

Usage: python backend.py --record FILE [--host 127.0.0.1] [--port 0] [--mode aa|ae|ar]

- Binds HOST:PORT (port 0: the kernel picks one), then prints `listening HOST:PORT` on stdout
  and flushes: wait for that line before sending.
- Every frame received is appended to FILE as one JSON line, written and flushed BEFORE the ACK
  goes out, so a sender that holds the ACK can read its record:
  `{"control_id": MSH-10, "type": MSH-9, "facility": MSH-4, "application": MSH-3,
    "version": MSH-12, "ack": "AA", "built_by": "hl7apy"|"hand"}`
  A frame that is not an HL7 message at all (hl7apy's MLLP framing regex refuses it) is
  recorded too, as `{"control_id": null, "invalid_frame": true, "bytes": N}`, and gets no
  answer (hl7apy closes the connection), so "nothing reached the backend" can be checked on the
  file.
- The ACK: MSH-9 `ACK^<trigger>^ACK`, MSH-3..6 swapped from the message, MSH-11/12 copied,
  MSA-1 = the --mode code (AA by default), MSA-2 = the message's MSH-10. It is built with
  hl7apy; when hl7apy cannot parse the message or build the ACK (a version it does not know, a
  message it refuses), it is built by hand with the message's own delimiters, the same fields.
- Transport is hl7apy's stock `MLLPServer`: one message per connection, the connection is
  closed after the ACK (that is how hl7apy 1.3.x behaves; a client must reconnect).
"""
import argparse
import datetime
import json
import sys
import threading

from hl7apy.core import Message
from hl7apy.mllp import AbstractErrorHandler, AbstractHandler, MLLPRequestHandler, MLLPServer
from hl7apy.parser import parse_message

SB, EB, CR = "\x0b", "\x1c", "\r"

_lock = threading.Lock()
_counter = [0]
ARGS = None


def _next_id():
    with _lock:
        _counter[0] += 1
        return "BACKEND-%d" % _counter[0]


def _record(entry):
    with _lock:
        with open(ARGS.record, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()


def _split_msh(message):
    """The MSH fields of `message` as a list indexed by field number (index 1 = MSH-1), and its
    delimiters; `None` when there is no readable MSH."""
    seg = message.lstrip().split("\r", 1)[0].split("\n", 1)[0]
    if not seg.startswith("MSH") or len(seg) < 8:
        return None
    fs = seg[3]
    rest = seg[4:].split(fs)
    fields = ["MSH", fs] + rest  # fields[n] = MSH-n
    enc = fields[2]
    comp = enc[0] if len(enc) > 0 else "^"
    return fields, fs, enc, comp


def _field(fields, n):
    return fields[n] if fields is not None and len(fields) > n else ""


def _describe(message):
    parsed = _split_msh(message)
    fields = parsed[0] if parsed else None
    comp = parsed[3] if parsed else "^"
    return {
        "control_id": _field(fields, 10) or None,
        "type": _field(fields, 9) or None,
        "facility": _field(fields, 4).split(comp)[0] or None,
        "application": _field(fields, 3).split(comp)[0] or None,
        "version": _field(fields, 12).split(comp)[0] or None,
    }


def _now():
    return datetime.datetime.now().strftime("%Y%m%d%H%M%S")


def _ack_by_hand(message, code, text):
    parsed = _split_msh(message)
    if parsed is None:
        fields, fs, enc, comp = None, "|", "^~\\&", "^"
    else:
        fields, fs, enc, comp = parsed
    trigger = _field(fields, 9).split(comp)[1] if comp in _field(fields, 9) else ""
    msh = [
        "MSH",
        enc,
        _field(fields, 5),
        _field(fields, 6),
        _field(fields, 3),
        _field(fields, 4),
        _now(),
        "",
        comp.join(["ACK", trigger, "ACK"]) if trigger else "ACK",
        _next_id(),
        _field(fields, 11) or "P",
        _field(fields, 12) or "2.5",
    ]
    msa = ["MSA", code, _field(fields, 10)]
    if text:
        msa.append(text)
    return fs.join(msh) + CR + fs.join(msa) + CR


def _ack_with_hl7apy(message, code, text):
    incoming = parse_message(message, find_groups=False)
    msh = incoming.msh
    version = msh.msh_12.to_er7().split("^")[0]
    ack = Message("ACK", version=version)
    ack.msh.msh_3 = msh.msh_5.to_er7()
    ack.msh.msh_4 = msh.msh_6.to_er7()
    ack.msh.msh_5 = msh.msh_3.to_er7()
    ack.msh.msh_6 = msh.msh_4.to_er7()
    ack.msh.msh_7 = _now()
    trigger = msh.msh_9.msh_9_2.to_er7()
    ack.msh.msh_9 = "ACK^%s^ACK" % trigger if trigger else "ACK"
    ack.msh.msh_10 = _next_id()
    ack.msh.msh_11 = msh.msh_11.to_er7() or "P"
    ack.msa.msa_1 = code
    ack.msa.msa_2 = msh.msh_10.to_er7()
    if text:
        ack.msa.msa_3 = text
    er7 = ack.to_er7()
    if not er7.endswith(CR):
        er7 += CR
    return er7


def build_ack(message, code, text=""):
    """The ACK text (unframed) and who built it."""
    try:
        return _ack_with_hl7apy(message, code, text), "hl7apy"
    except Exception as e:  # noqa: BLE001 - any hl7apy failure: fall back
        sys.stderr.write("hl7apy could not build the ACK (%s: %s); building it by hand\n"
                         % (type(e).__name__, e))
        sys.stderr.flush()
        return _ack_by_hand(message, code, text), "hand"


class AckHandler(AbstractHandler):
    def reply(self):
        message = self.incoming_message
        code = ARGS.mode.upper()
        text = "" if code == "AA" else "test backend answers %s" % code
        ack, built_by = build_ack(message, code, text)
        entry = _describe(message)
        entry.update({"ack": code, "built_by": built_by})
        _record(entry)
        return SB + ack + EB + CR


class ErrorHandler(AbstractErrorHandler):
    """Messages hl7apy's server cannot route (no readable MSH-9): record, answer AE by hand."""

    def reply(self):
        message = self.incoming_message
        ack = _ack_by_hand(message, "AE", "unreadable message: %s" % self.exc)
        entry = _describe(message)
        entry.update({"ack": "AE", "built_by": "hand", "error": str(self.exc)})
        _record(entry)
        return SB + ack + EB + CR


class AnyType(dict):
    """hl7apy looks handlers up by the full MSH-9 text: answer every message type."""

    def __missing__(self, key):
        return (AckHandler,)


class RecordingRequestHandler(MLLPRequestHandler):
    """hl7apy's request handler, recording the frames its framing regex refuses (and drops)."""

    def _extract_hl7_message(self, msg):
        message = MLLPRequestHandler._extract_hl7_message(self, msg)
        if message is None:
            _record({"control_id": None, "invalid_frame": True, "bytes": len(msg)})
        return message


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--record", required=True, help="append one JSON line per message received")
    p.add_argument("--mode", choices=["aa", "ae", "ar"], default="aa")
    p.add_argument("--timeout", type=float, default=10,
                   help="seconds a connection may stay silent (hl7apy's request timeout)")
    ARGS = p.parse_args()
    # The record file exists from the start (empty until a message arrives).
    open(ARGS.record, "a", encoding="utf-8").close()
    handlers = AnyType({"ERR": (ErrorHandler,)})
    server = MLLPServer(ARGS.host, ARGS.port, handlers, timeout=ARGS.timeout,
                        request_handler_class=RecordingRequestHandler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    sys.stdout.write("listening %s:%d\n" % (host, port))
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
