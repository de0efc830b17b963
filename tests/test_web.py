"""The chat page at "/", driven in headless Chromium through the DevTools protocol.

Needs Debian's chromium, which `bash recipes/setup.sh --dev` installs.
The screenshot of the finished conversation is kept in the test's tmp dir (its path is printed).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tiny_chat import free_port, make_artifact, start_server, stop_server

KEY = "page-key"
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


class Browser:
    """Just enough of the Chrome DevTools Protocol: evaluate JS, type, press keys, take screenshots."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{expression} stayed false for {timeout} s; page text: {self.js('document.body.innerText')}")

    def type_and_send(self, text: str) -> None:
        self.js("document.getElementById('input').focus()")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)


@pytest.fixture
def browser(tmp_path):
    """A fresh headless Chromium (own profile), connected to its first tab."""
    assert BROWSER, "no chromium on PATH: `bash recipes/setup.sh --dev` installs Debian's chromium"
    from websockets.sync.client import connect

    profile = tmp_path / "profile"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1000,700",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]
    proc = subprocess.Popen([BROWSER, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"  # chromium writes the port it picked here
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"chromium did not open its DevTools port (exit code {proc.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
        with connect(url, max_size=None, open_timeout=30) as ws:
            yield Browser(ws)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder, port = tmp_path_factory.mktemp("web"), free_port()
    proc = start_server(make_artifact(folder), port, f"api_key={KEY}", log=folder / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def completion(server: str, messages: list[dict], max_tokens: int) -> str:
    body = json.dumps({"messages": messages, "temperature": 0, "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(f"{server}/v1/chat/completions", data=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def test_page_streams_replies_keeps_the_conversation_and_shows_errors(server, browser, tmp_path):
    browser.call("Page.enable")
    browser.call("Page.navigate", url=server + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('input')")
    browser.js(f"""(() => {{
        const set = (id, v) => {{ const e = document.getElementById(id); e.value = v;
                                  e.dispatchEvent(new Event('change')); }};
        set('key', {json.dumps(KEY)}); set('temperature', '0'); set('max-tokens', '16'); }})()""")

    browser.type_and_send("Hello, who are you?")
    first = browser.wait_for("(() => { const a = document.querySelector('.assistant:not(.pending)');"
                             " return a && a.textContent; })()")
    history = [{"role": "user", "content": "Hello, who are you?"}]
    assert first == completion(server, history, 16)  # the streamed reply, as the API answers it
    assert first in browser.js("document.body.innerText")

    browser.type_and_send("Tell me more.")  # the second turn is asked with the first one as context
    second = browser.wait_for("(() => { const a = document.querySelectorAll('.assistant:not(.pending)');"
                              " return a.length === 2 && a[1].textContent; })()")
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "Tell me more."}]
    assert second == completion(server, history, 16)

    browser.js("document.getElementById('max-tokens').value = '5000'")
    browser.type_and_send("One more?")
    error = browser.wait_for("(() => { const e = document.querySelector('.error'); return e && e.textContent; })()")
    assert "max_tokens=5000" in error  # the server's own message is shown

    shot = tmp_path / "chat.png"
    shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 1000


def test_page_is_served_without_a_key_but_the_api_is_not(server):
    with urllib.request.urlopen(server + "/", timeout=10) as response:
        assert "text/html" in response.headers["Content-Type"] and b"/v1/chat/completions" in response.read()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(f"{server}/v1/chat/completions", data=b"{}"), timeout=10)
    assert e.value.code == 401
