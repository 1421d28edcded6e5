"""A minimal upstream SMTP server that keeps the exact bytes it received (what goes on the wire)."""

from __future__ import annotations

import trio


class RawUpstream:
    def __init__(self) -> None:
        self.sessions: list[bytes] = []  # the raw bytes of each connection
        self.port = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        raw = bytearray()
        self.sessions.append(b"")
        index = len(self.sessions) - 1
        buffer = b""
        in_data = False
        await stream.send_all(b"220 upstream.test ESMTP\r\n")
        try:
            while chunk := await stream.receive_some(65536):
                raw += chunk
                self.sessions[index] = bytes(raw)
                buffer += chunk
                while True:
                    if in_data:
                        end = buffer.find(b"\r\n.\r\n")
                        if end < 0 and not buffer.startswith(b".\r\n"):
                            break
                        buffer = buffer[end + 5:] if end >= 0 else buffer[3:]
                        in_data = False
                        await stream.send_all(b"250 2.0.0 stored\r\n")
                        continue
                    line, sep, rest = buffer.partition(b"\r\n")
                    if not sep:
                        break
                    buffer = rest
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        await stream.send_all(b"250-upstream.test\r\n250 8BITMIME\r\n")
                    elif verb == b"DATA":
                        in_data = True
                        await stream.send_all(b"354 go ahead\r\n")
                    elif verb == b"QUIT":
                        await stream.send_all(b"221 bye\r\n")
                        return
                    else:
                        await stream.send_all(b"250 ok\r\n")
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    def transactions(self) -> list[bytes]:
        """Every DATA payload received (still dot-stuffed, up to and with CRLF.CRLF)."""
        out = []
        for raw in self.sessions:
            parts = raw.split(b"\r\nDATA\r\n")
            for part in parts[1:]:
                end = part.find(b"\r\n.\r\n")
                if end >= 0:  # whole ones only
                    out.append(part[: end + 5])
        return out

    def envelopes(self) -> list[tuple[bytes, list[bytes]]]:
        out = []
        for raw in self.sessions:
            sender, rcpts, in_data = None, [], False
            for line in raw.split(b"\r\n"):
                if in_data:
                    in_data = line != b"."
                elif line.upper().startswith(b"MAIL FROM:"):
                    sender, rcpts = line[10:], []
                elif line.upper().startswith(b"RCPT TO:"):
                    rcpts.append(line[8:])
                elif line.upper() == b"DATA" and sender is not None:
                    out.append((sender, rcpts))
                    sender, in_data = None, True
        return out
