"""Regenerate docs/mail-ja.png and docs/mail-en.png: the /mail page with a few held messages.

    python scripts/screenshots.py      (needs chromium, chromium-driver and the test extras)
"""

import smtplib
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firmware import app  # noqa: E402
from firmware.config import loads  # noqa: E402
from tests.browser.conftest import Browser  # noqa: E402

MESSAGES = [
    ("Taro Yamada <taro@office.example>", ["client@partner.example"], [], [],
     "=?UTF-8?B?6KaL56mN5pu4IOesrDLniYg=?="),
    ("Taro Yamada <taro@office.example>", [f"member{i}@customer.example" for i in range(1, 9)],
     ["boss@office.example"], ["audit@office.example", "archive@office.example"],
     "Quarterly report (draft)"),
    ("Hanako <hanako@office.example>", ["hr@office.example"], [], [], "<b>Leave request</b>"),
]


def send(port: int) -> None:
    for sender, to, cc, bcc, subject in MESSAGES:
        headers = f"From: {sender}\r\nTo: {', '.join(to)}\r\n"
        if cc:
            headers += f"Cc: {', '.join(cc)}\r\n"
        message = f"{headers}Subject: {subject}\r\n\r\nHello.\r\n".encode()
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.sendmail(sender, to + cc + bcc, message)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = loads(f'data_dir = "{tmp}"\n[smtp]\nlisten = ["127.0.0.1:0"]\nlisten_tls = []\n'
                       '[web]\nlisten = ["127.0.0.1:0"]\n', source="screenshots.toml")
        async with trio.open_nursery() as nursery:
            running = await nursery.start(app.serve, config)
            await trio.to_thread.run_sync(send, running.smtp[0][1])
            for lang in ("ja", "en"):
                browser = await trio.to_thread.run_sync(Browser, lang)
                try:
                    await browser.get(f"http://127.0.0.1:{running.web[0][1]}/mail")
                    await browser.wait_for("return document.getElementById('live').dataset.state === 'live'")
                    await browser.js("document.querySelector('details').open = true")
                    await trio.sleep(1.5)  # the "new" highlight fades in the live list
                    await browser.run(browser.driver.save_screenshot, str(ROOT / f"docs/mail-{lang}.png"))
                finally:
                    browser.close()
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
