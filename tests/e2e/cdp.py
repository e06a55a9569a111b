"""A small Chrome DevTools Protocol client: headless Debian ``chromium`` driven over its websocket.

One browser per test; each :class:`Tab` lives in its own browser context (a fresh cookie jar, like a new
private window), so "a fresh browser" is one call.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import websockets

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--disable-extensions", "--password-store=basic", "--remote-debugging-port=0",
         "--host-resolver-rules=MAP *.localhost 127.0.0.1, MAP localhost 127.0.0.1",
         "--window-size=1000,700"]


class Browser:
    def __init__(self, ws: Any, proc: asyncio.subprocess.Process) -> None:
        self.ws = ws
        self.proc = proc
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._events: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())  # noqa: TID251 - test helper

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                msg = json.loads(raw)
                if "id" in msg and msg["id"] in self._pending:
                    fut = self._pending.pop(msg["id"])
                    if "error" in msg:
                        fut.set_exception(RuntimeError(f"CDP error: {msg['error']}"))
                    else:
                        fut.set_result(msg.get("result", {}))
                elif "method" in msg:
                    key = f"{msg.get('sessionId', '')}:{msg['method']}"
                    self._events.setdefault(key, asyncio.Queue()).put_nowait(msg.get("params", {}))

    async def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
                   timeout: float = 30) -> Any:
        msg_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send(json.dumps(msg))
        return await asyncio.wait_for(fut, timeout)

    def events(self, session: str, method: str) -> asyncio.Queue[dict[str, Any]]:
        return self._events.setdefault(f"{session}:{method}", asyncio.Queue())

    async def new_tab(self) -> Tab:
        """A page in a new browser context (its own cookies): a fresh browser, as far as sites can tell."""
        ctx = (await self.send("Target.createBrowserContext", {"disposeOnDetach": True}))["browserContextId"]
        target = (await self.send("Target.createTarget", {"url": "about:blank", "browserContextId": ctx}))["targetId"]
        session = (await self.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        tab = Tab(self, session)
        await tab.send("Page.enable")
        await tab.send("Runtime.enable")
        return tab


class Tab:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self.browser.send(method, params, self.session)

    async def _wait_loaded(self, timeout: float = 20) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await asyncio.sleep(0.05)
        while loop.time() < deadline:
            state = await self.eval("document.readyState")
            if state == "complete":
                await asyncio.sleep(0.1)
                if await self.eval("document.readyState") == "complete":
                    return
            await asyncio.sleep(0.05)
        raise TimeoutError("page did not finish loading")

    async def goto(self, url: str) -> str:
        """Navigate (following redirects) and return the final URL."""
        queue = self.browser.events(self.session, "Page.loadEventFired")
        while not queue.empty():
            queue.get_nowait()
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise RuntimeError(f"navigation to {url} failed: {result['errorText']}")
        await asyncio.wait_for(queue.get(), 20)
        await self._wait_loaded()
        return str(await self.eval("location.href"))

    async def click(self, selector: str) -> str:
        queue = self.browser.events(self.session, "Page.loadEventFired")
        while not queue.empty():
            queue.get_nowait()
        await self.eval(f"document.querySelector({json.dumps(selector)}).click()")
        await asyncio.wait_for(queue.get(), 20)
        await self._wait_loaded()
        return str(await self.eval("location.href"))

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def text(self) -> str:
        return str(await self.eval("document.body ? document.body.innerText : ''"))

    async def screenshot(self, path: Path) -> Path:
        data = (await self.send("Page.captureScreenshot", {"format": "png"}))["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.asynccontextmanager
async def chromium(extra_flags: tuple[str, ...] = ()) -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        raise RuntimeError("chromium not installed (apt-get install -y chromium)")
    profile = Path(tempfile.mkdtemp(prefix="ussy-chromium-"))
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, *extra_flags, f"--user-data-dir={profile}", "about:blank",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().count("\n") >= 1:
                break
            if proc.returncode is not None:
                raise RuntimeError("chromium exited at start-up")
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().split("\n")[:2]
        async with websockets.connect(f"ws://127.0.0.1:{port}{path}", max_size=64 * 1024 * 1024) as ws:
            browser = Browser(ws, proc)
            try:
                yield browser
            finally:
                browser._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await browser._reader
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
