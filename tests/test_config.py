"""The configuration loads from TOML with defaults from one table, and every bad value is a
ConfigError naming the file, the dotted key and the value."""

import ipaddress
import os
from pathlib import Path

import pytest

from txmta import config
from txmta.config import ConfigError, load, load_text, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "etc" / "txmta.toml"
MAN = ROOT / "man" / "txmta.toml.5"


@pytest.mark.parametrize("text, expected", [
    ("100", 100),
    ("100B", 100),
    ("512KiB", 512 * 1024),
    ("35MiB", 35 * 1024 * 1024),
    ("35mib", 35 * 1024 * 1024),
    ("1GiB", 1 << 30),
    ("10MB", 10_000_000),
    ("10kb", 10_000),
    ("1GB", 10 ** 9),
    ("1.5KiB", 1536),
    ("0", 0),
])
def test_parse_size(text, expected):
    """Binary units are powers of 1024, decimal ones of 1000, bare numbers are bytes."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "10 parsecs", "-1MiB", "1e3", "ten"])
def test_parse_size_rejects_garbage(text):
    """Anything that is not number+unit is a ValueError."""
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text, expected", [
    ("0", 0.0),
    ("30s", 30.0),
    ("5m", 300.0),
    ("1h", 3600.0),
    ("5d", 432000.0),
    ("1w", 604800.0),
    ("1h30m", 5400.0),
    ("1H30M", 5400.0),
    ("250ms", 0.25),
    ("45", 45.0),
])
def test_parse_duration(text, expected):
    """Durations are seconds; units s m h d w (and ms) combine, e.g. 1h30m."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "m", "5 minutes", "-5m", "1h 30m", "5mh", "nan", "5x"])
def test_parse_duration_rejects_garbage(text):
    """Anything else is a ValueError."""
    with pytest.raises(ValueError):
        parse_duration(text)


def test_defaults_match_documented_values():
    """With no file: one listener 127.0.0.1:25 with STARTTLS, documented limits and schedule."""
    c = config.defaults()
    assert c.path is None
    assert c.listen == (config.ListenConfig("127.0.0.1:25", "127.0.0.1", 25, "starttls", "none",
                                            "reject-remote"),)
    assert c.server.hostname
    assert c.server.max_errors == 20
    assert c.server.command_timeout == 300.0
    assert (c.server.command_time_limit, c.server.data_time_limit) == (60.0, 1200.0)
    assert c.spool.max_message_size == 35 * 1024 * 1024
    assert c.spool.map_size == 1 << 30 and c.spool.max_map_size == 64 << 30
    assert c.spool.inline_body_limit == 256 * 1024
    assert c.retry.schedule == (60, 300, 900, 1800, 3600, 7200, 14400)
    assert c.retry.max_lifetime == 5 * 86400
    assert c.relay.networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert c.tls == config.TLSConfig() and c.auth == config.AuthConfig()
    assert c.delivery.relayhost == "" and c.dns.nameservers == () and c.log == config.LogConfig()
    # RFC 5321 4.5.3.2: 5 min per command, 2 min for DATA, 3 per block, 10 after the dot
    d = c.delivery
    assert (d.command_timeout, d.data_init_timeout, d.data_xfer_timeout,
            d.data_done_timeout) == (300.0, 120.0, 180.0, 600.0)


def test_dataclass_defaults_equal_loaded_defaults():
    """The dataclass field defaults come from the same table as the loader's."""
    c = config.defaults()
    assert c.spool == config.SpoolConfig()
    assert c.retry == config.RetryConfig()
    assert c.relay == config.RelayConfig()


def test_empty_text_gives_defaults_with_its_path():
    """An empty file is the defaults, remembering where it came from."""
    c = load_text("", "x.toml")
    assert c.path == "x.toml"
    assert c.spool == config.defaults().spool


def test_sample_file_loads_and_listens_on_2525():
    """etc/txmta.toml loads, listens on 127.0.0.1:2525 (no root needed) and uses spool "spool"."""
    c = load(str(SAMPLE))
    assert c.path == str(SAMPLE)
    assert [(l.host, l.port) for l in c.listen] == [("127.0.0.1", 2525)]
    assert c.spool.path == "spool"
    assert [str(n) for n in c.relay.networks] == ["127.0.0.0/8", "::1/128"]
    assert c.tls.cert is None


def test_sample_file_and_man_page_mention_every_key():
    """Each option is documented in both the sample file and txmta.toml(5)."""
    sample = SAMPLE.read_text()
    man = MAN.read_text()
    for section, keys in config._TABLE.items():
        for key in keys:
            assert f"{key} =" in sample, f"{section}.{key} missing from etc/txmta.toml"
            assert key.replace("_", r"\(ul") in man or key in man, f"{section}.{key} missing from man page"


def test_full_file_overrides_every_section(tmp_path):
    """Every section's values reach the dataclasses, converted."""
    cert, key, users = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "users"
    for f in (cert, key, users):
        f.write_text("x")
    c = load_text(f"""
[server]
hostname = "mx.example.org"
max_connections = 10
max_connections_per_ip = 2
max_recipients = 5
max_errors = 3
command_timeout = "30s"
data_timeout = "10m"
command_time_limit = "2m"
data_time_limit = "1h"
[[listen]]
address = "0.0.0.0:25"
[[listen]]
address = "[::1]:465"
tls = "implicit"
auth = "required"
bare_newlines = "fix"
[tls]
cert = "{cert}"
key = "{key}"
[auth]
users = "{users}"
[relay]
networks = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]
[spool]
path = "/var/spool/txmta"
max_message_size = "10MB"
map_size = "64MiB"
max_map_size = "1GiB"
inline_body_limit = "64KiB"
[delivery]
relayhost = "[smarthost.example.net]:587"
[retry]
schedule = ["30s", "1h30m"]
max_lifetime = "2d"
[dns]
nameservers = ["127.0.0.1", "127.0.0.1:5353", "[::1]:53"]
[log]
maillog = "/var/log/txmta/mail.log"
format = "json"
""", "t.toml")
    assert c.server == config.ServerConfig("mx.example.org", 10, 2, 5, 3, 30.0, 600.0, 120.0, 3600.0)
    assert c.listen[0] == config.ListenConfig("0.0.0.0:25", "0.0.0.0", 25)
    assert c.listen[1] == config.ListenConfig("[::1]:465", "::1", 465, "implicit", "required", "fix")
    assert c.tls == config.TLSConfig(str(cert), str(key), None)
    assert c.auth.users == str(users)
    assert [str(n) for n in c.relay.networks] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]
    assert c.spool == config.SpoolConfig("/var/spool/txmta", 10_000_000, 64 << 20, 1 << 30, 64 << 10)
    assert c.delivery.relayhost == "[smarthost.example.net]:587"
    assert c.retry == config.RetryConfig((30.0, 5400.0), 2 * 86400)
    assert c.dns.nameservers == ("127.0.0.1", "127.0.0.1:5353", "[::1]:53")
    assert c.log == config.LogConfig("/var/log/txmta/mail.log", "json")


def test_config_is_frozen():
    """Configuration values cannot be changed after load."""
    c = config.defaults()
    with pytest.raises(AttributeError):
        c.spool.path = "elsewhere"  # type: ignore[misc]


@pytest.mark.parametrize("toml, key, value", [
    ('[[listen]]\naddress = "127.0.0.1:25"\ntls = "tls13"', "listen[0].tls", '"tls13"'),
    ('[[listen]]\naddress = "127.0.0.1:0"', "listen[0].address", '"127.0.0.1:0"'),
    ('[[listen]]\naddress = "127.0.0.1:65536"', "listen[0].address", '"127.0.0.1:65536"'),
    ('[[listen]]\naddress = "::1:25"', "listen[0].address", '"::1:25"'),
    ('[[listen]]\naddress = "127.0.0.1"', "listen[0].address", '"127.0.0.1"'),
    ('[[listen]]\naddress = "mail.example.org:25"', "listen[0].address", '"mail.example.org:25"'),
    ('[[listen]]\ntls = "none"', "listen[0].address", None),
    ('[[listen]]\naddress = "127.0.0.1:25"\nport = 25', "listen[0].port", "25"),
    ('[[listen]]\naddress = "127.0.0.1:25"\n[[listen]]\naddress = "127.0.0.1:25"',
     "listen[1].address", '"127.0.0.1:25"'),
    ('[[listen]]\naddress = "[::1]:25"\n[[listen]]\naddress = "[0:0::1]:25"',
     "listen[1].address", '"[0:0::1]:25"'),
    ('[[listen]]\naddress = "127.0.0.1:25"\n[[listen]]\naddress = "127.0.0.1:465"\ntls = "implicit"',
     "listen[1].tls", '"implicit"'),
    ('[[listen]]\naddress = "127.0.0.1:587"\nauth = "required"', "listen[0].auth", '"required"'),
    ('[[listen]]\naddress = "127.0.0.1:587"\nbare_newlines = "ignore"',
     "listen[0].bare_newlines", '"ignore"'),
    ('[listen]\naddress = "127.0.0.1:25"', "listen", None),
    ('[server]\nmax_connections = "many"', "server.max_connections", '"many"'),
    ('[server]\nmax_connections = 0', "server.max_connections", "0"),
    ('[server]\nmax_errors = true', "server.max_errors", "true"),
    ('[server]\ncommand_timeout = 300', "server.command_timeout", "300"),
    ('[server]\ncommand_timeout = "0"', "server.command_timeout", '"0"'),
    ('[server]\nhost_name = "x"', "server.host_name", '"x"'),
    ('[spool]\nmax_message_size = "0"', "spool.max_message_size", '"0"'),
    ('[spool]\nmax_message_size = "35 megs"', "spool.max_message_size", '"35 megs"'),
    ('[spool]\nmax_message_size = 1000', "spool.max_message_size", "1000"),
    ('[spool]\nmap_size = "2GiB"\nmax_map_size = "1GiB"', "spool.map_size", '"2GiB"'),
    ('[relay]\nnetworks = ["10.0.0.1/8"]', "relay.networks", '["10.0.0.1/8"]'),
    ('[relay]\nnetworks = ["localhost"]', "relay.networks", '["localhost"]'),
    ('[relay]\nnetworks = "127.0.0.0/8"', "relay.networks", '"127.0.0.0/8"'),
    ('[retry]\nschedule = []', "retry.schedule", "[]"),
    ('[retry]\nschedule = ["1m", "soon"]', "retry.schedule", '["1m", "soon"]'),
    ('[retry]\nmax_lifetime = "forever"', "retry.max_lifetime", '"forever"'),
    ('[delivery]\nrelayhost = "smarthost:smtp"', "delivery.relayhost", '"smarthost:smtp"'),
    ('[delivery]\nrelayhost = "2001:db8::1"', "delivery.relayhost", '"2001:db8::1"'),
    ('[dns]\nnameservers = ["dns.example.net"]', "dns.nameservers", '["dns.example.net"]'),
    ('[log]\nformat = "xml"', "log.format", '"xml"'),
    ('[log]\nmaillog = false', "log.maillog", "false"),
    ('[tls]\ncert = "/etc/hostname"', "tls.cert", '"/etc/hostname"'),
    ('[tls]\nkey = "/etc/hostname"', "tls.key", '"/etc/hostname"'),
    ('[tls]\ncert = "/nonexistent/c.pem"\nkey = "/nonexistent/k.pem"', "tls.cert", '"/nonexistent/c.pem"'),
    ('[auth]\nusers = "/nonexistent/users"', "auth.users", '"/nonexistent/users"'),
    ('[frobnicate]\nx = 1', "frobnicate", None),
    ('server = 1', "server", "1"),
])
def test_bad_value_names_file_key_and_value(toml, key, value):
    """Every invalid setting is a ConfigError `file: key = value: reason`."""
    with pytest.raises(ConfigError) as e:
        load_text(toml, "etc/txmta.toml")
    text = str(e.value)
    prefix = f"etc/txmta.toml: {key} = {value}: " if value is not None else f"etc/txmta.toml: {key}"
    assert text.startswith(prefix), text
    assert e.value.key == key
    assert e.value.path == "etc/txmta.toml"


def test_message_for_bad_choice_lists_the_choices():
    """The example from the design: a bad TLS mode lists the valid ones."""
    with pytest.raises(ConfigError) as e:
        load_text('[[listen]]\naddress = "127.0.0.1:25"\ntls = "tls13"', "etc/txmta.toml")
    assert str(e.value) == ('etc/txmta.toml: listen[0].tls = "tls13": '
                            'must be one of "none", "starttls", "implicit"')


def test_toml_syntax_error_names_file():
    """A TOML syntax error is a ConfigError naming the file and the position."""
    with pytest.raises(ConfigError, match=r"^bad\.toml: TOML syntax error: .*line 2"):
        load_text("[server]\nmax_errors = = 3\n", "bad.toml")


def test_missing_file_is_a_config_error(tmp_path):
    """An unreadable file is a ConfigError naming it."""
    path = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=f"^{path}: cannot read"):
        load(path)


def test_load_none_without_default_file_gives_defaults(monkeypatch, tmp_path):
    """load(None) falls back to built-in defaults when /etc/txmta/txmta.toml is absent."""
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    assert load(None).path is None


def test_load_none_reads_default_file_when_present(monkeypatch, tmp_path):
    """load(None) reads DEFAULT_PATH when it exists."""
    f = tmp_path / "txmta.toml"
    f.write_text('[spool]\npath = "/srv/spool"\n')
    monkeypatch.setattr(config, "DEFAULT_PATH", str(f))
    c = load(None)
    assert c.path == str(f) and c.spool.path == "/srv/spool"


def test_readable_tls_and_users_files_are_accepted(tmp_path):
    """Existing cert, key and users files allow implicit TLS and AUTH listeners; paths stay as written."""
    for name in ("c.pem", "k.pem", "users"):
        (tmp_path / name).write_text("x")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        c = load_text('[tls]\ncert = "c.pem"\nkey = "k.pem"\n[auth]\nusers = "users"\n'
                      '[[listen]]\naddress = "127.0.0.1:465"\ntls = "implicit"\nauth = "optional"\n')
    finally:
        os.chdir(cwd)
    assert c.tls.cert == "c.pem" and c.auth.users == "users"
    assert c.listen[0].tls == "implicit" and c.listen[0].auth == "optional"


def test_tls_policy_dkim_and_signing_sections(tmp_path):
    """[[tls.policy]], [delivery] tls_level, [[dkim]] and [signing] load into values."""
    key = tmp_path / "k.pem"
    key.write_text("not parsed here\n")
    c = config.load_text(f'''
[tls]
min_version = "TLSv1.3"
[[tls.policy]]
domain = "Example.ORG."
level = "verify"
[[tls.policy]]
domain = "dane.example"
level = "dane"
[delivery]
tls_level = "may"
[[dkim]]
domain = "example.org"
selector = "rsa2026"
key = "{key}"
[[dkim]]
domain = "example.org"
selector = "ed2026"
key = "{key}"
algorithm = "ed25519-sha256"
[signing]
default_domain = "EXAMPLE.org"
''')
    assert c.tls.min_version == "TLSv1.3"
    assert c.tls.level_for("example.org") == "verify"
    assert c.tls.level_for("DANE.example.") == "dane"
    assert c.tls.level_for("other.example") is None
    assert c.delivery.tls_level == "may"
    assert [(k.selector, k.algorithm) for k in c.dkim] == [("rsa2026", "rsa-sha256"),
                                                           ("ed2026", "ed25519-sha256")]
    assert c.signing.default_domain == "example.org"
    d = config.defaults()
    assert (d.delivery.tls_level, d.tls.policy, d.dkim, d.signing.default_domain) == ("auto", (), (), "")


@pytest.mark.parametrize("text, key", [
    ('[[tls.policy]]\ndomain = "x.example"\nlevel = "must"', "tls.policy"),
    ('[[tls.policy]]\ndomain = "x.example"', "tls.policy"),
    ('[[tls.policy]]\ndomain = "bad domain"\nlevel = "may"', "tls.policy"),
    ('[[tls.policy]]\ndomain = "a.example"\nlevel = "may"\nmx = "x"', "tls.policy"),
    ('[[tls.policy]]\ndomain = "a.example"\nlevel = "may"\n[[tls.policy]]\ndomain = "A.example"\nlevel = "none"',
     "tls.policy"),
    ('[tls]\nmin_version = "TLSv1.1"', "tls.min_version"),
    ('[delivery]\ntls_level = "dane-only"', "delivery.tls_level"),
    ('[delivery]\nrelayhost_tls = "dane"', "delivery.relayhost_tls"),
    ('[[dkim]]\ndomain = "a.example"\nselector = "s"\nkey = "/nonexistent/k.pem"', "dkim[0].key"),
    ('[[dkim]]\ndomain = "a.example"\nkey = "/etc/hostname"', "dkim[0].selector"),
    ('[[dkim]]\ndomain = "a.example"\nselector = "s"\nkey = "/etc/hostname"\nalgorithm = "rsa-sha1"',
     "dkim[0].algorithm"),
    ('[[dkim]]\ndomain = "a.example"\nselector = "bad sel"\nkey = "/etc/hostname"', "dkim[0].selector"),
    ('[dkim]\ndomain = "a.example"', "dkim"),
    ('[signing]\ndefault_domain = "a.example"', "signing.default_domain"),
])
def test_tls_and_dkim_errors_name_the_key(text, key):
    with pytest.raises(config.ConfigError) as e:
        config.load_text(text, "f.toml")
    assert str(e.value).startswith(f"f.toml: {key}"), str(e.value)


# -- [[pool]]: IP pools ----------------------------------------------------------------------

POOLS = """
[[pool]]
name = "bulk"
addresses = [{address = "192.0.2.20", helo = "bulk1.example.com", weight = 3},
             {address = "2001:db8:0::21", helo = "Bulk2.Example.com."}]
method = "weighted"
lanes = ["bulk"]
sender_domains = ["News.Example.com"]
cooldown = "30m"

[[pool]]
name = "main"
addresses = [{address = "192.0.2.10"}]
"""


def test_pools_load_with_their_addresses_and_selectors():
    from txmta.outbound.ippool import IPPool, PoolAddress
    c = load_text(POOLS)
    assert c.pools == (
        IPPool("bulk", (PoolAddress("192.0.2.20", "bulk1.example.com", 3),
                        PoolAddress("2001:db8::21", "bulk2.example.com", 1)),
               "weighted", ("bulk",), ("news.example.com",), (), 1800.0),
        IPPool("main", (PoolAddress("192.0.2.10", "", 1),)))
    assert c.pools[1].is_default and c.pools[1].cooldown == 3600.0
    assert load_text("").pools == ()


@pytest.mark.parametrize("toml, key", [
    ('[[pool]]\nname = "p"', "pool[0].addresses"),
    ('[[pool]]\nname = "p"\naddresses = []', "pool[0].addresses"),
    ('[[pool]]\nname = "p"\naddresses = ["192.0.2.1"]', "pool[0].addresses"),
    ('[[pool]]\nname = "p"\naddresses = [{address = "mta.example.com"}]', "pool[0].addresses"),
    ('[[pool]]\nname = "p"\naddresses = [{address = "192.0.2.1", port = 25}]', "pool[0].addresses"),
    ('[[pool]]\nname = "p"\naddresses = [{address = "192.0.2.1", weight = 0}]', "pool[0].addresses"),
    ('[[pool]]\nname = "p"\naddresses = [{address = "192.0.2.1", helo = "not a name"}]',
     "pool[0].addresses"),
    ('[[pool]]\nname = "p"\naddresses = [{address = "192.0.2.1"}, {address = "192.0.2.1"}]',
     "pool[0].addresses"),
    ('[[pool]]\nname = "p"\naddresses = [{address = "192.0.2.1"}]\nmethod = "random"',
     "pool[0].method"),
    ('[[pool]]\nname = "p"\naddresses = [{address = "192.0.2.1"}]\nlanes = ["nosuch"]',
     "pool[0].lanes"),
    ('[[pool]]\nname = "p"\naddresses = [{address = "192.0.2.1"}]\ncooldown = "0"',
     "pool[0].cooldown"),
    ('[[pool]]\nname = "p"\naddresses = [{address = "192.0.2.1"}]\n'
     '[[pool]]\nname = "p"\naddresses = [{address = "192.0.2.2"}]\nlanes = ["bulk"]', "pool[1].name"),
    ('[[pool]]\nname = "a"\naddresses = [{address = "192.0.2.1"}]\n'
     '[[pool]]\nname = "b"\naddresses = [{address = "192.0.2.2"}]', "pool[1].name"),
    ('[pool]\nname = "p"', "pool"),
])
def test_bad_pools_name_the_key(toml, key):
    with pytest.raises(ConfigError) as e:
        load_text(toml, "etc/txmta.toml")
    assert e.value.key == key, str(e.value)


# -- relayhost failover ([delivery] relayhost as a list of tables) ------------------------------

def test_a_relayhost_string_is_one_relay_with_the_flat_keys(tmp_path):
    """The string form keeps working: one relay named relay0 with relayhost_* keys."""
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    c = load_text(f'[delivery]\nrelayhost = "[smart.example.net]:587"\nrelayhost_tls = "verify"\n'
                  f'relayhost_username = "u"\nrelayhost_password_file = "{pw}"\n', "t.toml")
    assert c.delivery.relayhost == "[smart.example.net]:587"
    assert c.delivery.relayhosts == (config.RelayHost("[smart.example.net]:587", "relay0", "u",
                                                      str(pw), "verify"),)
    assert (c.delivery.fallback, c.delivery.relay_failures, c.delivery.relay_failure_window,
            c.delivery.relay_cooldown, c.delivery.relay_max_cooldown) == ("none", 5, 60.0, 60.0, 600.0)
    assert config.defaults().delivery.relayhosts == ()


def test_relayhost_tables_in_order_with_their_own_auth_and_tls(tmp_path):
    """[[delivery.relayhost]] tables (or an inline array) give relays tried in order, each
    with its own port, name, AUTH and TLS level; the first is also `relayhost`."""
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    c = load_text(f'''[delivery]
fallback = "mx"
relay_failures = 2
relay_cooldown = "30s"
[[delivery.relayhost]]
host = "[smtp.provider-a.example]"
port = 587
username = "me"
password_file = "{pw}"
tls = "verify"
[[delivery.relayhost]]
host = "192.0.2.25"
name = "backup"
[[delivery.relayhost]]
host = "[::1]"
port = 2525
tls = "none"
''', "t.toml")
    assert c.delivery.relayhosts == (
        config.RelayHost("[smtp.provider-a.example]:587", "relay0", "me", str(pw), "verify"),
        config.RelayHost("192.0.2.25", "backup", "", None, "may"),
        config.RelayHost("[::1]:2525", "relay2", "", None, "none"))
    assert c.delivery.relayhost == "[smtp.provider-a.example]:587"
    assert (c.delivery.fallback, c.delivery.relay_failures, c.delivery.relay_cooldown) == ("mx", 2, 30.0)
    inline = load_text('[delivery]\nrelayhost = [{host = "192.0.2.25"}, {host = "192.0.2.26", '
                       'port = 2525}]', "t.toml")
    assert [r.spec for r in inline.delivery.relayhosts] == ["192.0.2.25", "192.0.2.26:2525"]


@pytest.mark.parametrize("toml, key, value", [
    ('[delivery]\nrelayhost = []', "delivery.relayhost", "[]"),
    ('[delivery]\nrelayhost = 25', "delivery.relayhost", "25"),
    ('[[delivery.relayhost]]\nport = 25', "delivery.relayhost[0].host", None),
    ('[[delivery.relayhost]]\nhost = "smart:smtp"', "delivery.relayhost[0].host", '"smart:smtp"'),
    ('[[delivery.relayhost]]\nhost = "a.example:25"\nport = 587', "delivery.relayhost[0].port", "587"),
    ('[[delivery.relayhost]]\nhost = "a.example"\nport = 0', "delivery.relayhost[0].port", "0"),
    ('[[delivery.relayhost]]\nhost = "a.example"\ntls = "dane"', "delivery.relayhost[0].tls", '"dane"'),
    ('[[delivery.relayhost]]\nhost = "a.example"\nuser = "x"', "delivery.relayhost[0].user", '"x"'),
    ('[[delivery.relayhost]]\nhost = "a.example"\nusername = "x"',
     "delivery.relayhost[0].password_file", None),
    ('[[delivery.relayhost]]\nhost = "a.example"\npassword_file = "/nonexistent/pw"',
     "delivery.relayhost[0].password_file", '"/nonexistent/pw"'),
    ('[[delivery.relayhost]]\nhost = "a.example"\nname = "a.example"',
     "delivery.relayhost[0].name", '"a.example"'),
    ('[[delivery.relayhost]]\nhost = "a.example"\n[[delivery.relayhost]]\nhost = "a.example"\nport = 25',
     "delivery.relayhost[1].host", '"a.example"'),
    ('[[delivery.relayhost]]\nhost = "a.example"\nname = "x"\n[[delivery.relayhost]]\n'
     'host = "b.example"\nname = "x"', "delivery.relayhost[1].name", '"x"'),
    ('[delivery]\nrelayhost_tls = "none"\n[[delivery.relayhost]]\nhost = "a.example"',
     "delivery.relayhost_tls", '"none"'),
    ('[delivery]\nrelayhost_username = "u"\n[[delivery.relayhost]]\nhost = "a.example"',
     "delivery.relayhost_username", '"u"'),
    ('[delivery]\nfallback = "mx"', "delivery.fallback", '"mx"'),
    ('[delivery]\nrelayhost = "a.example"\nfallback = "direct"', "delivery.fallback", '"direct"'),
    ('[delivery]\nrelay_failures = 0', "delivery.relay_failures", "0"),
    ('[delivery]\nrelay_cooldown = "0"', "delivery.relay_cooldown", '"0"'),
    ('[delivery]\nrelay_cooldown = "5m"\nrelay_max_cooldown = "1m"',
     "delivery.relay_max_cooldown", '"1m"'),
])
def test_bad_relayhost_tables_name_file_key_and_value(toml, key, value):
    """A bad relayhost table or failover key is a ConfigError naming the file and the key."""
    with pytest.raises(ConfigError) as e:
        load_text(toml, "etc/txmta.toml")
    text = str(e.value)
    prefix = f"etc/txmta.toml: {key} = {value}: " if value is not None else f"etc/txmta.toml: {key}"
    assert text.startswith(prefix), text
    assert e.value.key == key


def test_suppression_ttl_by_category_defaults_to_a_day_for_bad_domain():
    """bad-domain (often our own resolver failing) suppresses for 1 day, invalid-recipient
    for 90; a table in the file is merged over those, and checked."""
    c = config.defaults()
    assert dict(c.suppression.ttl_by_category) == {"bad-domain": 86400.0,
                                                   "invalid-recipient": 90 * 86400.0}
    c = load_text('[suppression]\nttl_by_category = { "invalid-recipient" = "30d", '
                  '"policy" = "2h" }\n')
    assert dict(c.suppression.ttl_by_category) == {"bad-domain": 86400.0,
                                                   "invalid-recipient": 30 * 86400.0,
                                                   "policy": 7200.0}
    with pytest.raises(ConfigError, match=r'suppression.ttl_by_category.*"nope": must be one of'):
        load_text('[suppression]\nttl_by_category = { "nope" = "1d" }\n', "x.toml")
    with pytest.raises(ConfigError, match=r'suppression.ttl_by_category.*"bad-domain": must be greater'):
        load_text('[suppression]\nttl_by_category = { "bad-domain" = "0s" }\n', "x.toml")
    with pytest.raises(ConfigError, match=r"suppression.ttl_by_category.*must be a table"):
        load_text('[suppression]\nttl_by_category = "1d"\n', "x.toml")
