"""Settings: the only place that reads them.

The file is TOML. Every key has a default, so an empty file (or no file: the
embedded default) is a working gateway. A bad file fails as a whole, with the
file, the key and what is wrong, before anything starts.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "Config",
    "BoardConfig",
    "ConfigError",
    "HoldConfig",
    "LOCAL_NETWORKS",
    "SmtpConfig",
    "RouteConfig",
    "UpstreamConfig",
    "WebConfig",
    "WhitelistConfig",
    "default",
    "load",
    "loads",
    "parse_listen",
]

EMBEDDED_SOURCE = "<embedded default>"

# Loopback, RFC 1918, unique-local and link-local: "the office LAN" unless told otherwise.
LOCAL_NETWORKS: tuple[IPv4Network | IPv6Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
        "169.254.0.0/16",
        "fe80::/10",
    )
)

ON_BOOT = ("send", "resume")
BOARD_KINDS = ("sim", "linux")
UPSTREAM_TLS = ("none", "starttls", "implicit")
UPSTREAM_MODES = ("explicit", "transparent")


class ConfigError(Exception):
    """A setting is wrong. str() is "FILE: key: what is wrong"."""

    def __init__(self, source: str, key: str | None, problem: str):
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)


@dataclass(frozen=True)
class SmtpConfig:
    listen: tuple[str, ...] = ("127.0.0.1:2525",)  # plain + STARTTLS
    listen_tls: tuple[str, ...] = ("127.0.0.1:2465",)  # implicit TLS
    max_message_size: int = 100 * 1024 * 1024
    allowed_networks: tuple[IPv4Network | IPv6Network, ...] = LOCAL_NETWORKS
    plain_auth_networks: tuple[IPv4Network | IPv6Network, ...] = LOCAL_NETWORKS
    hostname: str = "matte.local"


@dataclass(frozen=True)
class HoldConfig:
    seconds: int = 300
    max_messages: int = 500
    max_bytes: int = 200 * 1024 * 1024
    max_recipients: int = 500
    on_boot: str = "send"  # "send" | "resume"


@dataclass(frozen=True)
class WhitelistConfig:
    senders: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpstreamConfig:
    host: str | None = None
    port: int = 25
    tls: str = "none"  # "none" | "starttls" | "implicit"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    retry_seconds: int = 600
    outbox: Path | None = None
    ca_file: Path | None = None
    helo: str | None = None  # after load(): smtp.hostname unless set
    mode: str = "explicit"  # "explicit" (smarthost and routes) | "transparent" (B10)


@dataclass(frozen=True)
class RouteConfig:
    """A smarthost for the senders of one domain (explicit mode, B10)."""

    host: str
    port: int = 25
    tls: str = "none"
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class WebConfig:
    listen: tuple[str, ...] = ("127.0.0.1:8080",)
    listen_tls: tuple[str, ...] = ()  # HTTPS with the device certificate
    names: tuple[str, ...] = ()  # host names the page answers to, besides smtp.hostname


@dataclass(frozen=True)
class BoardConfig:
    kind: str = "sim"  # "sim" | "linux"
    led: str = "matte:status"  # under leds_dir
    fault_led: str | None = None  # a second LED lit only on fault, if the board has one
    leds_dir: Path = Path("/sys/class/leds")
    watchdog: Path | None = Path("/dev/watchdog")  # "" in the file: no watchdog
    interface: str = "eth0"  # the LAN link, under net_dir
    net_dir: Path = Path("/sys/class/net")
    kick_seconds: float = 1.0  # how often the watchdog is kicked while healthy
    stall_seconds: float = 10.0  # an event loop blocked this long stops the kicks
    upstream_fault_seconds: float = 300.0  # upstream unreachable this long: LED "fault"

    def options(self) -> dict[str, Any]:
        """Constructor arguments for board.open_board(kind)."""
        if self.kind == "sim":
            return {}
        return {"led": self.led, "fault_led": self.fault_led, "leds_dir": self.leds_dir,
                "watchdog": self.watchdog, "interface": self.interface, "net_dir": self.net_dir}


@dataclass(frozen=True)
class Config:
    data_dir: Path = Path("var")
    audit_log: Path | None = None  # None after load(): data_dir/"audit.jsonl"
    audit_log_max_bytes: int = 8 * 1024 * 1024  # then a new file; the old ones numbered
    audit_log_keep: int = 4
    smtp: SmtpConfig = SmtpConfig()
    hold: HoldConfig = HoldConfig()
    whitelist: WhitelistConfig = WhitelistConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    web: WebConfig = WebConfig()
    board: BoardConfig = BoardConfig()
    # Sender domain ("example.com", or ".example.com" for its subdomains) -> its smarthost.
    routes: dict[str, RouteConfig] = field(default_factory=dict)
    source: str = EMBEDDED_SOURCE

    def describe(self) -> list[str]:
        """A short human summary (no secrets), e.g. for `matte check-config`."""
        s, h, w, u = self.smtp, self.hold, self.whitelist, self.upstream
        if u.host is not None:
            up = f"{u.host}:{u.port} tls={u.tls}"
            if u.username is not None:
                up += f" user={u.username} (password set)"
            up += f", retry for {u.retry_seconds} s"
        else:
            up = f"outbox {u.outbox} (.eml files, nothing is sent)"
        return [
            f"data_dir: {self.data_dir}",
            f"audit_log: {self.audit_log} (new file after {_size(self.audit_log_max_bytes)}, "
            f"{self.audit_log_keep} old kept)",
            "smtp: listen {} / implicit TLS {}; max message {}; hostname {}".format(
                _join(s.listen), _join(s.listen_tls), _size(s.max_message_size), s.hostname
            ),
            f"smtp: clients from {_join(map(str, s.allowed_networks))}",
            f"smtp: AUTH without TLS from {_join(map(str, s.plain_auth_networks))}",
            "hold: {} s, at most {} messages / {}, up to {} recipients, on boot: {}".format(
                h.seconds, h.max_messages, _size(h.max_bytes), h.max_recipients, h.on_boot
            ),
            f"whitelist: {len(w.senders)} sender rules, {len(w.recipients)} recipient rules",
            f"upstream: {up}",
            f"board: {self.board.kind}, watchdog kick every {self.board.kick_seconds} s, "
            f"stall after {self.board.stall_seconds} s",
            f"web: {_join(self.web.listen)}",
            f"web (HTTPS): {_join(self.web.listen_tls)}",
        ]


def _join(items) -> str:
    items = list(items)
    return ", ".join(items) if items else "(none)"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


# --- value checks -------------------------------------------------------------------------------
# Each check takes the TOML value and returns the converted one, or raises _Bad(what is wrong).


class _Bad(Exception):
    def __init__(self, problem: str, key_suffix: str = ""):
        super().__init__(problem)
        self.problem = problem
        self.key_suffix = key_suffix


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _positive_int(value: Any) -> int:
    # bool is an int in Python, never in a config file
    if type(value) is not int:
        raise _Bad(f"expected a positive integer, got {_type_name(value)}")
    if value < 1:
        raise _Bad(f"must be at least 1, got {value}")
    return value


def _port(value: Any) -> int:
    if type(value) is not int:
        raise _Bad(f"expected a port number, got {_type_name(value)}")
    if not 1 <= value <= 65535:
        raise _Bad(f"port must be 1..65535, got {value}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {_type_name(value)}")
    return value


def _nonempty_string(value: Any) -> str:
    value = _string(value)
    if not value or value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _Bad(f"expected a non-empty string without surrounding spaces or controls, got {value!r}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        value = _string(value)
        if value not in options:
            raise _Bad(f"must be one of {', '.join(repr(o) for o in options)}, got {value!r}")
        return value

    return check


def _list_of(item: Callable[[Any], Any], *, allow_empty: bool = True) -> Callable[[Any], tuple]:
    def check(value: Any) -> tuple:
        if not isinstance(value, list):
            raise _Bad(f"expected an array, got {_type_name(value)}")
        if not value and not allow_empty:
            raise _Bad("must not be empty")
        out = []
        for i, v in enumerate(value):
            try:
                converted = item(v)
            except _Bad as e:
                raise _Bad(e.problem, f"[{i}]") from None
            if converted not in out:  # duplicates are harmless: drop them
                out.append(converted)
        return tuple(out)

    return check


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")


def _is_hostname(name: str) -> bool:
    """Letters, digits, '-' and '_' in dot-separated labels; non-ASCII labels allowed (IDN)."""
    if not name or len(name) > 253:
        return False
    for label in name.lower().split("."):
        if label.isascii():
            if not _LABEL.match(label):
                return False
        elif not label or not all(c.isalnum() or c == "-" for c in label):
            return False
    return True


def _hostname(value: Any) -> str:
    value = _string(value)
    if not _is_hostname(value):
        raise _Bad(f"not a valid host name: {value!r}")
    return value


def _host(value: Any) -> str:
    """A host name or an IP address literal (upstream.host)."""
    value = _string(value)
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _is_hostname(value):
        raise _Bad(f"not a valid host name or IP address: {value!r}")
    return value


def parse_listen(value: str) -> tuple[str, int]:
    """'host:port' or '[v6addr]:port' -> (host, port). Raises ValueError saying what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"expected \"host:port\", got {_type_name(value)}")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f'expected "[IPv6 address]:port", got {value!r}')
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets: {host!r}") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f'expected "host:port", got {value!r}')
        if ":" in host:
            raise ValueError(f'IPv6 addresses go in brackets, e.g. "[::1]:25", got {value!r}')
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if host[0].isdigit() and host.replace(".", "").isdigit():
                raise ValueError(f"not a valid IPv4 address: {host!r}") from None
            if not _is_hostname(host):
                raise ValueError(f"not a valid host name: {host!r}") from None
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"port must be a number, got {port!r}")
    number = int(port)
    # Port 0 binds a free port, which the log line "ready: ..." names (useful for tests).
    if not 0 <= number <= 65535:
        raise ValueError(f"port must be 0..65535, got {number}")
    return host, number


def _listen(value: Any) -> str:
    try:
        parse_listen(value)
    except ValueError as e:
        raise _Bad(str(e)) from None
    return value


def _network(value: Any) -> IPv4Network | IPv6Network:
    value = _string(value)
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise _Bad(f"not an IP network (like 192.168.1.0/24 or 2001:db8::/32): {value!r}") from None


def _whitelist_rule(value: Any) -> str:
    """`local@domain` (that address), `domain` (that domain), `.domain` (its subdomains)."""
    value = _string(value)
    rule = value.strip().lower()
    local, at, domain = rule.rpartition("@")
    if at and not local:
        raise _Bad(f"a domain rule is written without '@' (e.g. {domain!r}), got {value!r}")
    if at and any(c.isspace() or ord(c) < 32 for c in local):
        raise _Bad(f"not an address: {value!r}")
    if at:
        if not _is_hostname(domain):
            raise _Bad(f"not a valid domain in address {value!r}")
        return rule
    bare = domain[1:] if domain.startswith(".") else domain
    if not _is_hostname(bare) or "." not in bare:
        raise _Bad(f"expected an address (user@example.com), a domain (example.com) or .domain "
                   f"(its subdomains), got {value!r}")
    return rule


def _positive_seconds(value: Any) -> float:
    if type(value) not in (int, float):
        raise _Bad(f"expected a number of seconds, got {_type_name(value)}")
    if not 0 < value < 1e9:
        raise _Bad(f"must be more than 0 seconds, got {value}")
    return float(value)


def _name(value: Any) -> str:
    """A sysfs entry name (an LED or a network interface): no '/' and not '.' or '..'."""
    value = _nonempty_string(value)
    if "/" in value or value in (".", ".."):
        raise _Bad(f"expected a name, not a path: {value!r}")
    return value


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The empty string turns the setting off (None)."""
    return lambda value: None if value == "" else check(value)


def _path(value: Any) -> Path:
    value = _string(value)
    if not value.strip() or "\x00" in value:
        raise _Bad(f"expected a path, got {value!r}")
    return Path(value).expanduser()


# --- sections -----------------------------------------------------------------------------------

_SECTIONS: dict[str, tuple[type, dict[str, Callable[[Any], Any]]]] = {
    "smtp": (
        SmtpConfig,
        {
            "listen": _list_of(_listen),
            "listen_tls": _list_of(_listen),
            "max_message_size": _positive_int,
            "allowed_networks": _list_of(_network),
            "plain_auth_networks": _list_of(_network),
            "hostname": _hostname,
        },
    ),
    "hold": (
        HoldConfig,
        {
            "seconds": _positive_int,
            "max_messages": _positive_int,
            "max_bytes": _positive_int,
            "max_recipients": _positive_int,
            "on_boot": _choice(ON_BOOT),
        },
    ),
    "board": (
        BoardConfig,
        {
            "kind": _choice(BOARD_KINDS),
            "led": _name,
            "fault_led": _optional(_name),
            "leds_dir": _path,
            "watchdog": _optional(_path),
            "interface": _name,
            "net_dir": _path,
            "kick_seconds": _positive_seconds,
            "stall_seconds": _positive_seconds,
            "upstream_fault_seconds": _positive_seconds,
        },
    ),
    "whitelist": (
        WhitelistConfig,
        {"senders": _list_of(_whitelist_rule), "recipients": _list_of(_whitelist_rule)},
    ),
    "upstream": (
        UpstreamConfig,
        {
            "host": _host,
            "port": _port,
            "tls": _choice(UPSTREAM_TLS),
            "username": _nonempty_string,
            "password": _string,
            "retry_seconds": _positive_int,
            "outbox": _path,
            "ca_file": _path,
            "helo": _hostname,
            "mode": _choice(UPSTREAM_MODES),
        },
    ),
    "web": (WebConfig, {"listen": _list_of(_listen, allow_empty=False),
                        "listen_tls": _list_of(_listen), "names": _list_of(_host)}),
}

_TOP: dict[str, Callable[[Any], Any]] = {"data_dir": _path, "audit_log": _path,
                                          "audit_log_max_bytes": _positive_int,
                                          "audit_log_keep": _positive_int}


def _unknown(source: str, key: str, known) -> ConfigError:
    name = key.rpartition(".")[2]
    hint = difflib.get_close_matches(name, list(known), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(sorted(known))})"
    return ConfigError(source, key, "unknown key" + suggestion)


def _read_section(source: str, name: str, table: Any) -> tuple[Any, set[str]]:
    cls, checks = _SECTIONS[name]
    if not isinstance(table, dict):
        raise ConfigError(source, name, f"expected a table ([{name}]), got {_type_name(table)}")
    values = {}
    for key, raw in table.items():
        if key not in checks:
            raise _unknown(source, f"{name}.{key}", checks)
        try:
            values[key] = checks[key](raw)
        except _Bad as e:
            raise ConfigError(source, f"{name}.{key}{e.key_suffix}", e.problem) from None
    return cls(**values), set(values)


_ROUTE_KEYS: dict[str, Callable[[Any], Any]] = {
    "host": _host, "port": _port, "tls": _choice(UPSTREAM_TLS),
    "username": _nonempty_string, "password": _string,
}


def _read_routes(source: str, table: Any) -> dict[str, RouteConfig]:
    """[routes."example.com"] host = ..., port = ..., tls = ... (B10)."""
    if not isinstance(table, dict):
        raise ConfigError(source, "routes", f"expected a table ([routes.\"example.com\"]), "
                          f"got {_type_name(table)}")
    routes = {}
    for domain, entry in table.items():
        where = f"routes.{domain}"
        bare = domain[1:] if domain.startswith(".") else domain
        if not _is_hostname(bare) or "." not in bare:
            raise ConfigError(source, where, "expected a sender domain (example.com) or "
                              f".domain (its subdomains), got {domain!r}")
        if not isinstance(entry, dict):
            raise ConfigError(source, where, f"expected a table, got {_type_name(entry)}")
        values = {}
        for key, raw in entry.items():
            if key not in _ROUTE_KEYS:
                raise _unknown(source, f"{where}.{key}", _ROUTE_KEYS)
            try:
                values[key] = _ROUTE_KEYS[key](raw)
            except _Bad as e:
                raise ConfigError(source, f"{where}.{key}", e.problem) from None
        if "host" not in values:
            raise ConfigError(source, f"{where}.host", "every route needs a host")
        if ("username" in values) != ("password" in values):
            raise ConfigError(source, f"{where}.password", "set both username and password, "
                              "or neither")
        if values.get("tls") == "implicit" and "port" not in values:
            values["port"] = 465  # SMTPS (RFC 8314)
        routes[domain.lower()] = RouteConfig(**values)
    return routes


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    return p if p.is_absolute() else base / p


def from_dict(data: dict, *, source: str, base_dir: Path) -> Config:
    """Build a Config from parsed TOML. Relative paths resolve against base_dir."""
    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    given: dict[str, set[str]] = {}
    for key, raw in data.items():
        if key in _SECTIONS:
            sections[key], given[key] = _read_section(source, key, raw)
        elif key == "routes":
            sections[key] = _read_routes(source, raw)
        elif key in _TOP:
            try:
                top[key] = _TOP[key](raw)
            except _Bad as e:
                raise ConfigError(source, key, e.problem) from None
        else:
            raise _unknown(source, key, [*_TOP, *_SECTIONS, "routes"])

    base_dir = base_dir.absolute()
    data_dir = _resolve(base_dir, top.get("data_dir", Config.data_dir))
    audit_log = _resolve(base_dir, top.get("audit_log")) or data_dir / "audit.jsonl"
    smtp = sections.get("smtp", SmtpConfig())
    hold = sections.get("hold", HoldConfig())
    whitelist = sections.get("whitelist", WhitelistConfig())
    web = sections.get("web", WebConfig())
    board = sections.get("board", BoardConfig())
    if board.kick_seconds >= board.stall_seconds:
        raise ConfigError(source, "board.kick_seconds", f"must be less than board.stall_seconds "
                          f"({board.stall_seconds}), or a healthy gateway would look stalled")
    up = sections.get("upstream", UpstreamConfig())
    up_given = given.get("upstream", set())

    if not smtp.listen and not smtp.listen_tls:
        raise ConfigError(source, "smtp.listen", "nothing to listen on (smtp.listen and "
                          "smtp.listen_tls are both empty)")
    if up.host is not None and up.outbox is not None:
        raise ConfigError(source, "upstream.outbox", "set either upstream.host (relay to a "
                          "server) or upstream.outbox (write .eml files), not both")
    if up.username is not None and up.password is None:
        raise ConfigError(source, "upstream.password", "upstream.username is set but "
                          "upstream.password is not")
    if up.password is not None and up.username is None:
        raise ConfigError(source, "upstream.username", "upstream.password is set but "
                          "upstream.username is not")
    if up.host is None:
        # Transparent mode verifies and greets each original destination with these two.
        meaningful = ("ca_file", "helo") if up.mode == "transparent" else ()
        for key in ("port", "tls", "username", "ca_file", "helo"):
            if key in up_given and key not in meaningful:
                raise ConfigError(source, f"upstream.{key}", "only means something with "
                                  "upstream.host (no upstream server is set)")
    routes = sections.get("routes", {})
    if up.mode == "transparent":
        if up.outbox is not None:
            raise ConfigError(source, "upstream.outbox", "transparent mode delivers to each "
                              "connection's original destination; it has no outbox")
        if routes:
            raise ConfigError(source, "routes", "routes per sender domain are for "
                              'upstream.mode = "explicit"')
    elif routes and up.host is None:
        raise ConfigError(source, "upstream.host", "routes are set, so a default smarthost "
                          "(upstream.host) is needed for the other senders")
    changes: dict[str, Any] = {
        "outbox": _resolve(base_dir, up.outbox),
        "ca_file": _resolve(base_dir, up.ca_file),
    }
    if up.host is None and up.outbox is None and up.mode == "explicit":
        changes["outbox"] = data_dir / "outbox"
    if up.helo is None:
        changes["helo"] = smtp.hostname
    if up.tls == "implicit" and "port" not in up_given:
        changes["port"] = 465  # SMTPS (RFC 8314)
    up = replace(up, **changes)

    return Config(
        data_dir=data_dir,
        audit_log=audit_log,
        audit_log_max_bytes=top.get("audit_log_max_bytes", Config.audit_log_max_bytes),
        audit_log_keep=top.get("audit_log_keep", Config.audit_log_keep),
        smtp=smtp,
        hold=hold,
        whitelist=whitelist,
        upstream=up,
        web=web,
        board=board,
        routes=routes,
        source=source,
    )


def loads(text: str, *, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Parse TOML text. base_dir (default: the current directory) anchors relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, None, f"not valid TOML: {e}") from None
    return from_dict(data, source=source, base_dir=base_dir if base_dir is not None else Path.cwd())


def load(path: Path | str) -> Config:
    """Read a config file; raises ConfigError("FILE: key: what is wrong")."""
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(source, None, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(source, None, f"not UTF-8 (byte {e.start})") from None
    return loads(text, source=source, base_dir=path.absolute().parent)


def default() -> Config:
    """The embedded default: needs nothing else; paths under the current directory."""
    return from_dict({}, source=EMBEDDED_SOURCE, base_dir=Path.cwd())


# keep the names of every key in one place for tests and docs
def known_keys() -> dict[str, tuple[str, ...]]:
    out = {"": tuple(_TOP)}
    for name, (cls, checks) in _SECTIONS.items():
        out[name] = tuple(checks)
    out["routes"] = tuple(_ROUTE_KEYS)  # the keys of each [routes."domain"] table
    return out
