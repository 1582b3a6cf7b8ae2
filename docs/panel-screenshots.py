#!/usr/bin/python3
"""Screenshots of the real panel for the README (docs/panel-*.png).

Starts `domauth serve` (target/debug or target/release) on a temporary data
dir, dnsmasq as the DNS server holding the validation records, and Debian's
headless Chromium through chromedriver's WebDriver API (plain HTTP, no
Python packages needed). Run from the repository root after `cargo build`:

    docs/panel-screenshots.py [path/to/domauth]

Needs: chromium, chromium-driver, dnsmasq (Debian packages).
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/debug/domauth")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def main():
    for tool in ("chromium", "chromedriver", "dnsmasq"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise SystemExit(f"{tool} is needed (apt-get install chromium chromium-driver dnsmasq)")
    work = tempfile.mkdtemp(prefix="domauth-shots-")
    panel, dns, smtp = free_port(), free_port(), free_port()
    config = os.path.join(work, "config.toml")
    with open(config, "w") as f:
        f.write(f"""
[server]
submission = ["127.0.0.1:{smtp}"]
submissions = []
[dns]
nameservers = ["127.0.0.1:{dns}"]
timeout = "2s"
[panel]
listen = ["127.0.0.1:{panel}"]
""")
    procs = []

    def cli(*args, stdin=""):
        out = subprocess.run([BIN, "--config", config, *args], input=stdin, text=True,
                             capture_output=True, cwd=work)
        if out.returncode != 0:
            raise SystemExit(f"{args}: {out.stderr}")
        return out.stdout

    def dnsmasq(records):
        for p in procs[1:2]:
            p.terminate()
            p.wait()
        del procs[1:2]
        args = ["dnsmasq", "-k", "--no-resolv", "--no-hosts", "--bind-interfaces",
                "--listen-address=127.0.0.1", f"--port={dns}", "--pid-file=",
                "--local=/example/"]
        args += [f"--txt-record={name},{value}" for name, value in records]
        procs.insert(1, subprocess.Popen(args, stderr=subprocess.DEVNULL))
        time.sleep(0.5)

    try:
        procs.append(subprocess.Popen([BIN, "serve", "--config", config], cwd=work,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(panel)
        dnsmasq([])
        cli("hosting", "add", "acme", "--domain", "acme.test")
        cli("hosting", "passwd", "acme", stdin="acme-demo-password\n")
        cli("mailbox", "add", "info@acme.test", stdin="secret\n")
        tokens = {}
        for d in ("partner.example", "shop.example", "newsletter.example"):
            tokens[d] = json.loads(cli("domain", "add", d, "--hosting", "acme", "--json"))["record"]["value"]
        dnsmasq([("domauthvalidation.partner.example", tokens["partner.example"]),
                 ("domauthvalidation.shop.example", "domauth-0000-old-value")])
        for d in tokens:
            subprocess.run([BIN, "--config", config, "domain", "verify", d, "--hosting", "acme"],
                           cwd=work, capture_output=True)
        cli("account", "add", "sales@partner.example", "billing@partner.example", "--hosting", "acme")

        driver_port = free_port()
        procs.append(subprocess.Popen(["chromedriver", f"--port={driver_port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(driver_port)
        base = f"http://127.0.0.1:{driver_port}"

        def wd(method, path, body=None):
            data = json.dumps(body).encode() if body is not None else None
            req = urllib.request.Request(base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.load(r)["value"]

        session = wd("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": ["--headless=new", "--no-sandbox",
                                            "--disable-dev-shm-usage", "--hide-scrollbars"]}}}})
        sid = session["sessionId"]
        s = f"/session/{sid}"

        def go(path):
            wd("POST", s + "/url", {"url": f"http://127.0.0.1:{panel}{path}"})

        def find(css):
            el = wd("POST", s + "/element", {"using": "css selector", "value": css})
            return next(iter(el.values()))

        def shot(name, width=1100, height=720):
            wd("POST", s + "/window/rect", {"width": width, "height": height})
            time.sleep(0.3)
            png = base64.b64decode(wd("GET", s + "/screenshot"))
            with open(os.path.join(ROOT, "docs", f"panel-{name}.png"), "wb") as f:
                f.write(png)
            print(f"docs/panel-{name}.png")

        go("/signin")
        wd("POST", s + f"/element/{find('#hosting')}/value", {"text": "acme"})
        shot("signin", 1100, 560)
        wd("POST", s + f"/element/{find('#password')}/value", {"text": "acme-demo-password"})
        wd("POST", s + f"/element/{find('#sign-in')}/click", {})
        go("/")
        shot("domains", 1100, 600)
        go("/domains/shop.example/verify")
        shot("record", 1100, 860)
        go("/domains/partner.example/accounts")
        wd("POST", s + f"/element/{find('#addresses')}/value",
           {"text": "press@partner.example, someone@elsewhere.example"})
        wd("POST", s + f"/element/{find('#save')}/click", {})
        shot("accounts", 1100, 820)
        go("/")
        shot("phone", 390, 844)
        wd("DELETE", s)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
