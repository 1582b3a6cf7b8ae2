"""Upstream smarthost for the end-to-end tests: a real aiosmtpd server on
loopback that stores every message it accepts as one JSON file (envelope +
byte-exact content), so a test can read what arrived.

Recipients whose local part starts with "reject" get a permanent 550 and
those starting with "defer" a temporary 451, to exercise bounces and retries.

Run with Debian's interpreter: /usr/bin/python3 sink.py PORT DIR [dsn]
It prints READY once it accepts connections and stops on SIGTERM. With "dsn"
it advertises DSN (RFC 3461) and accepts RET/ENVID/NOTIFY/ORCPT; aiosmtpd
alone refuses them with 555. The options are recorded upper-cased (aiosmtpd
upper-cases them).
"""

import asyncio
import base64
import json
import os
import signal
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

DSN_PARAMS = ("RET", "ENVID", "NOTIFY", "ORCPT")


class DsnSMTP(SMTP):
    """aiosmtpd that takes the DSN parameters (it keeps them in mail_options
    and rcpt_options; only BODY, SMTPUTF8 and SIZE are understood otherwise)."""

    def _getparams(self, params):
        result = super()._getparams(params)
        if result is not None:
            for name in DSN_PARAMS:
                result.pop(name, None)
        return result


class DsnController(Controller):
    def factory(self):
        return DsnSMTP(self.handler, **self.SMTP_kwargs)


class Store:
    def __init__(self, directory, dsn=False):
        self.directory = directory
        self.dsn = dsn
        self.count = 0
        self.lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.dsn:
            responses.insert(len(responses) - 1, "250-DSN")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        if local.startswith("reject"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        if local.startswith("defer"):
            return "451 4.3.0 <%s>: Temporary failure, try again" % address
        envelope.rcpt_tos.append(address)
        # One list per recipient, in the order of rcpt_tos.
        envelope.rcpt_options.append(list(rcpt_options))
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.count += 1
            n = self.count
        record = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "rcpt_options": envelope.rcpt_options,
            "data_b64": base64.b64encode(envelope.original_content).decode("ascii"),
        }
        name = "%08d-%d.json" % (n, os.getpid())
        tmp = os.path.join(self.directory, "." + name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.directory, name))
        return "250 2.0.0 OK stored as %s" % name


def main():
    port = int(sys.argv[1])
    directory = sys.argv[2]
    os.makedirs(directory, exist_ok=True)
    dsn = len(sys.argv) > 3 and sys.argv[3] == "dsn"
    factory = DsnController if dsn else Controller
    controller = factory(
        Store(directory, dsn), hostname="127.0.0.1", port=port, data_size_limit=0
    )
    controller.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("READY", flush=True)
    while not stop.wait(0.2):
        pass
    controller.stop()


if __name__ == "__main__":
    main()
