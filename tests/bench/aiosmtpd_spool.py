"""Benchmark peer: aiosmtpd accepting mail into a durable spool (a file per message, fsync)
before it answers 250. usage: aiosmtpd_spool.py PORT SPOOL_DIR"""

import asyncio
import os
import sys
import uuid

from aiosmtpd.smtp import SMTP


class Spool:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    async def handle_DATA(self, server, session, envelope):
        name = os.path.join(self.directory, uuid.uuid4().hex)
        with open(name, "wb") as f:
            f.write(f"{envelope.mail_from}\n{','.join(envelope.rcpt_tos)}\n".encode())
            f.write(envelope.original_content or envelope.content)
            f.flush()
            os.fsync(f.fileno())
        return "250 OK queued"


async def main(port: int, directory: str) -> None:
    loop = asyncio.get_running_loop()
    handler = Spool(directory)
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=100 * 1024 * 1024, enable_SMTPUTF8=True),
        "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
