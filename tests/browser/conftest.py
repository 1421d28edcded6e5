"""A real headless Chromium (Debian's, with its chromedriver) driven by selenium.

Selenium is blocking: every call goes through `Browser.run` in a worker thread, so the
gateway keeps running in this test's trio loop meanwhile.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
import trio
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration.conftest import start_gateway, upstream  # noqa: F401  (fixtures)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECONDS = 20  # bound for every wait on the page


class Browser:
    """One browser with its own profile (a separate context: no shared cookies or storage)."""

    def __init__(self, language: str = "ja") -> None:
        self.profile = tempfile.mkdtemp(prefix="matte-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=900,1000",
                     f"--user-data-dir={self.profile}", f"--lang={language}"):
            options.add_argument(flag)
        options.add_experimental_option("prefs", {"intl.accept_languages": language})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(WAIT_SECONDS)

    async def run(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args)

    async def get(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def js(self, script: str, *args):
        return await self.run(lambda: self.driver.execute_script(script, *args))

    async def wait_for(self, script: str, *args):
        """Wait until the page's `script` returns something true; returns it."""
        def until():
            return WebDriverWait(self.driver, WAIT_SECONDS, poll_frequency=0.1).until(
                lambda d: d.execute_script(script, *args))
        return await self.run(until)

    async def click(self, css: str) -> None:
        await self.run(lambda: self.driver.find_element("css selector", css).click())

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browsers():
    """Opens browsers on demand (in a thread: starting Chromium blocks), quits them all after."""
    opened: list[Browser] = []

    async def open_browser(language: str = "ja") -> Browser:
        try:
            browser = await trio.to_thread.run_sync(Browser, language)
        except WebDriverException as exc:  # say plainly what is missing; never skip
            raise AssertionError(f"cannot start {CHROMIUM} with {CHROMEDRIVER}: {exc}") from exc
        opened.append(browser)
        return browser

    yield open_browser
    for browser in opened:
        browser.close()


async def forward_from(source: str, target_port: int, *, block_websocket: bool = False,
                       task_status=trio.TASK_STATUS_IGNORED):
    """Listen on 127.0.0.1 and relay each connection to the gateway from `source`: a browser
    behind it is, for the gateway, a browser on another machine (127.0.0.2). With
    `block_websocket` it is also a middlebox that cuts every WebSocket upgrade, as some
    proxies and firewalls do."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def pipe(a: trio.abc.Stream, b: trio.abc.Stream, inspect: bool = False) -> None:
        try:
            while data := await a.receive_some(65536):
                if inspect and b"upgrade: websocket" in data.lower():
                    await a.aclose()
                    break
                await b.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await b.aclose()

    async def handle(client: trio.SocketStream) -> None:
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", target_port))
        upstream_stream = trio.SocketStream(sock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe, client, upstream_stream, block_websocket)
            nursery.start_soon(pipe, upstream_stream, client)

    await trio.serve_listeners(handle, listeners)
