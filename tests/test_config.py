import dataclasses
import ipaddress
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from firmware import config
from firmware.config import (
    LOCAL_NETWORKS,
    Config,
    ConfigError,
    HoldConfig,
    SmtpConfig,
    UpstreamConfig,
    WebConfig,
    WhitelistConfig,
    parse_listen,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "matte.toml"


def load_text(tmp_path, text, name="matte.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return config.load(path)


def error_of(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: ")
    return info.value


# --- defaults -------------------------------------------------------------------------------


def test_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.default()
    assert cfg.source == "<embedded default>"
    assert cfg.data_dir == tmp_path / "var"
    assert cfg.audit_log == tmp_path / "var" / "audit.jsonl"
    assert cfg.smtp == SmtpConfig()
    assert cfg.smtp.listen == ("127.0.0.1:2525",)
    assert cfg.smtp.listen_tls == ("127.0.0.1:2465",)
    assert cfg.smtp.max_message_size == 100 * 1024 * 1024
    assert cfg.hold == HoldConfig(seconds=300, max_messages=500, max_bytes=200 * 1024 * 1024,
                                  max_recipients=500, on_boot="send")
    assert cfg.whitelist == WhitelistConfig((), ())
    assert cfg.web == WebConfig(("127.0.0.1:8080",))
    assert cfg.upstream.host is None
    assert cfg.upstream.outbox == tmp_path / "var" / "outbox"
    assert cfg.upstream.helo == "matte.local"


def test_empty_file_is_the_default_relative_to_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    cfg = load_text(tmp_path, "")
    assert cfg.source == str(tmp_path / "matte.toml")
    assert cfg.data_dir == tmp_path / "var"
    assert cfg.upstream.outbox == tmp_path / "var" / "outbox"
    assert cfg.smtp == config.default().smtp
    assert cfg.hold == config.default().hold


def test_local_networks():
    nets = {str(n) for n in LOCAL_NETWORKS}
    assert nets == {"127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                    "fc00::/7", "169.254.0.0/16", "fe80::/10"}
    assert SmtpConfig().allowed_networks == LOCAL_NETWORKS


def test_frozen():
    cfg = config.default()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data_dir = Path("/x")  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hold.seconds = 1  # type: ignore[misc]


def test_every_dataclass_field_is_a_key():
    keys = config.known_keys()
    for name, cls in [("smtp", SmtpConfig), ("hold", HoldConfig), ("whitelist", WhitelistConfig),
                      ("upstream", UpstreamConfig), ("web", WebConfig)]:
        assert set(keys[name]) == {f.name for f in dataclasses.fields(cls)}
    top = {f.name for f in dataclasses.fields(Config)} - {"source"}
    assert set(keys[""]) | set(keys) - {""} == top


# --- a full file ----------------------------------------------------------------------------

FULL = """
data_dir = "/srv/matte"
audit_log = "logs/audit.jsonl"
audit_log_max_bytes = 1000000
audit_log_keep = 9

[smtp]
listen = ["0.0.0.0:25", "[::]:587", "mail.example.com:2525"]
listen_tls = []
max_message_size = 1000
allowed_networks = ["192.168.1.7/24", "2001:db8::/32"]
plain_auth_networks = []
hostname = "gw.example.com"

[hold]
seconds = 60
max_messages = 10
max_bytes = 5000
max_recipients = 20
on_boot = "resume"

[whitelist]
senders = ["Scanner@Example.COM", ".partner.example", "example.org", "example.org"]
recipients = ["boss@example.com"]

[upstream]
host = "smtp.example.com"
tls = "implicit"
username = "gw"
password = "pw"
retry_seconds = 30
ca_file = "ca.pem"
helo = "gw.example.com"

[web]
listen = ["[::1]:80", "127.0.0.1:8080"]
"""


def test_full_file(tmp_path):
    cfg = load_text(tmp_path, FULL)
    assert cfg.data_dir == Path("/srv/matte")
    assert cfg.audit_log == tmp_path / "logs" / "audit.jsonl"
    assert (cfg.audit_log_max_bytes, cfg.audit_log_keep) == (1000000, 9)
    assert cfg.smtp.listen == ("0.0.0.0:25", "[::]:587", "mail.example.com:2525")
    assert cfg.smtp.listen_tls == ()
    assert cfg.smtp.allowed_networks == (ipaddress.ip_network("192.168.1.0/24"),
                                         ipaddress.ip_network("2001:db8::/32"))
    assert cfg.smtp.plain_auth_networks == ()
    assert cfg.hold == HoldConfig(60, 10, 5000, 20, "resume")
    # lower-cased, duplicates dropped, order kept
    assert cfg.whitelist.senders == ("scanner@example.com", ".partner.example", "example.org")
    assert cfg.whitelist.recipients == ("boss@example.com",)
    up = cfg.upstream
    assert (up.host, up.port, up.tls, up.username, up.password) == (
        "smtp.example.com", 465, "implicit", "gw", "pw")
    assert up.outbox is None
    assert up.ca_file == tmp_path / "ca.pem"
    assert up.retry_seconds == 30
    assert cfg.web.listen == ("[::1]:80", "127.0.0.1:8080")


def test_password_not_in_repr_nor_describe(tmp_path):
    cfg = load_text(tmp_path, FULL.replace('"pw"', '"hunter2"'))
    assert "hunter2" not in repr(cfg)
    assert "hunter2" not in "\n".join(cfg.describe())


def test_explicit_port_wins_over_implicit_default(tmp_path):
    cfg = load_text(tmp_path, '[upstream]\nhost = "a.example"\ntls = "implicit"\nport = 4650\n')
    assert cfg.upstream.port == 4650
    cfg = load_text(tmp_path, '[upstream]\nhost = "a.example"\ntls = "starttls"\n')
    assert cfg.upstream.port == 25


def test_explicit_outbox(tmp_path):
    cfg = load_text(tmp_path, '[upstream]\noutbox = "out"\n')
    assert cfg.upstream.outbox == tmp_path / "out"
    assert cfg.upstream.host is None


# --- errors name the file, the key and what is wrong -----------------------------------------

BAD = [
    ("nonsense = 1", "nonsense", "unknown key"),
    ("[smtp]\nlisen = []", "smtp.lisen", "did you mean 'listen'"),
    ("[smpt]\n", "smpt", "did you mean 'smtp'"),
    ("smtp = 3", "smtp", "expected a table"),
    ('[smtp]\nlisten = "127.0.0.1:25"', "smtp.listen", "expected an array"),
    ('[smtp]\nlisten = ["127.0.0.1"]', "smtp.listen[0]", "host:port"),
    ('[smtp]\nlisten = ["127.0.0.1:25", "127.0.0.1:-1"]', "smtp.listen[1]", "port"),
    ('[smtp]\nlisten = ["127.0.0.1:99999"]', "smtp.listen[0]", "0..65535"),
    ('[smtp]\nlisten = ["::1:25"]', "smtp.listen[0]", "brackets"),
    ('[smtp]\nlisten = ["[zz]:25"]', "smtp.listen[0]", "IPv6"),
    ('[smtp]\nlisten = ["300.1.1.1:25"]', "smtp.listen[0]", "IPv4"),
    ('[smtp]\nlisten = ["127.0.0.1:http"]', "smtp.listen[0]", "number"),
    ("[smtp]\nlisten = []\nlisten_tls = []", "smtp.listen", "nothing to listen on"),
    ("[smtp]\nmax_message_size = 0", "smtp.max_message_size", "at least 1"),
    ("[smtp]\nmax_message_size = -5", "smtp.max_message_size", "at least 1"),
    ('[smtp]\nmax_message_size = "100M"', "smtp.max_message_size", "got a string"),
    ("[smtp]\nmax_message_size = 1.5", "smtp.max_message_size", "got a number"),
    ('[smtp]\nallowed_networks = ["10.0.0.0/33"]', "smtp.allowed_networks[0]", "not an IP network"),
    ('[smtp]\nplain_auth_networks = ["lan"]', "smtp.plain_auth_networks[0]", "not an IP network"),
    ('[smtp]\nhostname = "bad host"', "smtp.hostname", "host name"),
    ("[hold]\nseconds = true", "hold.seconds", "got a boolean"),
    ("[hold]\nmax_messages = 0", "hold.max_messages", "at least 1"),
    ('[hold]\non_boot = "later"', "hold.on_boot", "'send', 'resume'"),
    ('[whitelist]\nsenders = ["@example.com"]', "whitelist.senders[0]", "without '@'"),
    ('[whitelist]\nrecipients = ["ok.example", "not a domain"]', "whitelist.recipients[1]",
     "expected an address"),
    ('[whitelist]\nrecipients = ["user@"]', "whitelist.recipients[0]", "not a valid domain"),
    ("[whitelist]\nrecipients = [3]", "whitelist.recipients[0]", "expected a string"),
    ('[upstream]\nhost = "a.example"\ntls = "ssl"', "upstream.tls", "'none', 'starttls', 'implicit'"),
    ('[upstream]\nhost = "a.example"\nport = 0', "upstream.port", "1..65535"),
    ('[upstream]\nhost = "a.example"\nusername = "u"', "upstream.password", "username is set"),
    ('[upstream]\nhost = "a.example"\npassword = "p"', "upstream.username", "password is set"),
    ('[upstream]\nhost = "a.example"\noutbox = "out"', "upstream.outbox", "not both"),
    ('[upstream]\ntls = "starttls"', "upstream.tls", "upstream.host"),
    ('[upstream]\nhost = "bad host!"', "upstream.host", "host name"),
    ("[upstream]\nretry_seconds = 0", "upstream.retry_seconds", "at least 1"),
    ("[web]\nlisten = []", "web.listen", "must not be empty"),
    ("data_dir = 5", "data_dir", "expected a string"),
    ('data_dir = ""', "data_dir", "expected a path"),
    ("audit_log_max_bytes = 0", "audit_log_max_bytes", "at least 1"),
    ('audit_log_keep = "all"', "audit_log_keep", "got a string"),
]


@pytest.mark.parametrize("text, key, problem", BAD)
def test_bad_values_name_key_and_problem(tmp_path, text, key, problem):
    err = error_of(tmp_path, text)
    assert err.key == key
    assert problem in err.problem
    assert str(err) == f"{tmp_path / 'bad.toml'}: {key}: {err.problem}"


def test_toml_syntax_error(tmp_path):
    err = error_of(tmp_path, "[smtp\n")
    assert err.key is None
    assert "not valid TOML" in str(err) and "line 1" in str(err)


def test_not_utf8(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[smtp]\nhostname = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


# --- parse_listen ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:25", ("127.0.0.1", 25)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ("[::1]:25", ("::1", 25)),
    ("[::]:587", ("::", 587)),
    ("[fe80::1%eth0]:25", ("fe80::1%eth0", 25)),
    ("localhost:8080", ("localhost", 8080)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", ":25", "127.0.0.1", "127.0.0.1:", "::1:25", "[::1]25",
                                  "[::1]", "host:-1", "host:70000", "a b:25", "1.2.3:25",
                                  "[1.2.3.4]:25", "host:２５"])
def test_parse_listen_rejects(text):
    with pytest.raises(ValueError):
        parse_listen(text)


@given(st.text(max_size=40))
def test_parse_listen_only_valueerror(text):
    try:
        host, port = parse_listen(text)
    except ValueError:
        return
    assert 0 <= port <= 65535 and host


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["listen", "seconds", "host", "smtp", "hold", "senders",
                                       "upstream", "x"]), children, max_size=3),
    max_leaves=8,
))
def test_from_dict_raises_only_config_error(data):
    if not isinstance(data, dict):
        data = {"smtp": data}
    try:
        config.from_dict(data, source="fuzz", base_dir=Path("/tmp"))
    except ConfigError as e:
        assert str(e).startswith("fuzz: ")


# --- the example --------------------------------------------------------------------------


def test_example_is_valid():
    cfg = config.load(EXAMPLE)
    assert cfg.hold == HoldConfig()


def test_example_documents_every_key():
    text = EXAMPLE.read_text(encoding="utf-8")
    section = ""
    documented = {}
    for line in text.splitlines():
        m = re.match(r"\[(\w+)\]", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"#(\w+) = ", line)
        if m:
            documented.setdefault(section, set()).add(m.group(1))
    for name, keys in config.known_keys().items():
        assert documented.get(name) == set(keys), name


def test_example_defaults_match_the_code():
    """Uncommenting the first example of each key (except the upstream server's) keeps the
    default configuration."""
    text = EXAMPLE.read_text(encoding="utf-8")
    lines, seen, section, skip = [], set(), "", {"upstream", "routes"}
    for line in text.splitlines():
        m = re.match(r"\[(\w+)\]", line)
        if m:
            section = m.group(1)
            lines.append(line)
            continue
        m = re.match(r"#(\w+) = ", line)
        if m and section not in skip and (section, m.group(1)) not in seen:
            seen.add((section, m.group(1)))
            lines.append(line[1:])
        elif lines and lines[-1].endswith(",") and line.startswith("#  "):
            lines.append(line[1:])  # continuation of a multi-line array
    data = tomllib.loads("\n".join(lines))
    cfg = config.from_dict(data, source="example", base_dir=EXAMPLE.parent)
    default = config.loads("", base_dir=EXAMPLE.parent)
    assert dataclasses.replace(cfg, source="") == dataclasses.replace(default, source="")
