"""A real browser for tests: Debian's headless Chromium driven over the DevTools protocol.

``chromium --screenshot`` / ``--dump-dom`` capture a page at its load event, before a Bokeh
document (the Dask dashboard) has fetched its models over its websocket and drawn anything;
so the page is opened here, the test's JavaScript condition is polled until it holds, and
only then is the screenshot taken and the DOM (shadow roots included) dumped.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Capture", "capture", "chromium_binary"]

# The DOM as HTML with every open shadow root inlined (Bokeh draws inside shadow roots).
_DEEP_HTML = """
(() => {
  const walk = (node) => {
    if (node.nodeType === Node.TEXT_NODE) return node.textContent;
    if (node.nodeType !== Node.ELEMENT_NODE) return '';
    const attrs = Array.from(node.attributes).map(a => ` ${a.name}="${a.value}"`).join('');
    let inner = '';
    if (node.shadowRoot) inner += '<shadow-root>' +
        Array.from(node.shadowRoot.childNodes).map(walk).join('') + '</shadow-root>';
    inner += Array.from(node.childNodes).map(walk).join('');
    const tag = node.tagName.toLowerCase();
    return `<${tag}${attrs}>${inner}</${tag}>`;
  };
  return walk(document.documentElement);
})()
"""


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Capture:
    png: bytes
    dom: str
    ready: bool  # whether the condition held before the timeout


def capture(url: str, *, ready_js: str = "true", timeout: float = 30.0,
            size: tuple[int, int] = (1400, 1000), settle: float = 1.0) -> Capture:
    """Open ``url`` in headless Chromium, wait until ``ready_js`` is truthy (then ``settle``
    seconds more), and return a PNG screenshot and the deep DOM."""
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="hpcpath-chromium-")
    proc = subprocess.Popen(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", "--disable-extensions", "--remote-debugging-port=0",
         "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}",
         f"--window-size={size[0]},{size[1]}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        ws_url = _devtools_url(proc, timeout=30)
        return asyncio.run(_drive(ws_url, url, ready_js, timeout, size, settle))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_url(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        m = re.search(r"DevTools listening on (ws://\S+)", line)
        if m:
            return m.group(1)
    raise RuntimeError("chromium did not start its DevTools endpoint")


async def _drive(ws_url: str, url: str, ready_js: str, timeout: float,
                 size: tuple[int, int], settle: float) -> Capture:
    from tornado.websocket import websocket_connect

    conn = await websocket_connect(ws_url, max_message_size=512 * 2**20)
    counter = 0

    async def call(method: str, session: str | None = None, **params):
        nonlocal counter
        counter += 1
        msg = {"id": counter, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        await conn.write_message(json.dumps(msg))
        while True:
            raw = await conn.read_message()
            if raw is None:
                raise RuntimeError("chromium closed the DevTools connection")
            reply = json.loads(raw)
            if reply.get("id") == counter:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    target = (await call("Target.createTarget", url="about:blank"))["targetId"]
    session = (await call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
    await call("Emulation.setDeviceMetricsOverride", session, width=size[0], height=size[1],
               deviceScaleFactor=1, mobile=False)
    await call("Page.navigate", session, url=url)
    deadline = time.monotonic() + timeout
    ready = False
    while time.monotonic() < deadline:
        res = await call("Runtime.evaluate", session, expression=f"Boolean({ready_js})",
                         returnByValue=True)
        if res.get("result", {}).get("value") is True:
            ready = True
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(settle)
    shot = await call("Page.captureScreenshot", session, format="png")
    dom = await call("Runtime.evaluate", session, expression=_DEEP_HTML, returnByValue=True)
    conn.close()
    return Capture(base64.b64decode(shot["data"]), dom.get("result", {}).get("value", ""), ready)


def save(cap: Capture, folder: str | os.PathLike[str], name: str) -> Path:
    """Keep a capture next to a test's outputs, for a person to look at."""
    path = Path(folder) / f"{name}.png"
    path.write_bytes(cap.png)
    (Path(folder) / f"{name}.html").write_text(cap.dom, encoding="utf-8")
    return path


def deep_count(selector: str) -> str:
    """JavaScript: how many elements match ``selector``, open shadow roots included."""
    return (
        f"(function f(root){{let n=root.querySelectorAll({json.dumps(selector)}).length;"
        "for(const e of root.querySelectorAll('*')){if(e.shadowRoot){n+=f(e.shadowRoot);}}"
        "return n;})(document)"
    )
