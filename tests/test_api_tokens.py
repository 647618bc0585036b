"""API tokens: the file format, `txmta api-token`, lookup, reloading and the rate limit."""

import os

import pytest
from hypothesis import given, strategies as st

from txmta import cli
from txmta.api import tokens as T


def test_add_token_appends_a_hash_and_check_finds_it(tmp_path):
    path = str(tmp_path / "tokens")
    token = T.add_token(path, "billing", ("send", "admin"), ("example.com",), "critical")
    text = open(path).read()
    assert token not in text                          # only the hash is kept
    assert text.startswith(f"billing:{T.hash_token(token)}")
    assert os.stat(path).st_mode & 0o777 == 0o600
    store = T.TokenStore(path, lambda: 0.0)
    found = store.check(token)
    assert found == T.Token("billing", frozenset({"send", "admin"}), ("example.com",), "critical")
    assert store.check("not-" + token) is None
    assert store.check(None) is None and store.check("") is None


def test_test_token_always_works_and_never_sends(tmp_path):
    store = T.TokenStore(None, lambda: 0.0)
    assert store.check("POSTMARK_API_TEST").test
    assert store.check("anything else") is None


@pytest.mark.parametrize("path, body", [
    (b"/email", {"From": "app@example.com", "To": "bob@example.org", "Subject": "a" * 1200,
                 "TextBody": "x"}),
    (b"/v1/messages", {"from": "app@example.com", "to": ["bob@example.org"],
                       "subject": "a" * 1200, "text": "x"}),
])
def test_a_test_token_is_refused_what_a_real_token_is_refused(path, body):
    """A request the message builder refuses (a Subject word too long for a 998-octet line)
    gets the same 422 with the test token as with a real one: not a 500, not a 200."""
    from test_api_deadlines import api, post
    for token in (T.TEST, T.Token("app")):
        resource, spool, _ = api()
        resource.tokens.check = lambda presented, token=token: token
        status, answer = post(resource, path, body)
        assert status == 422, (token, answer)
        assert "too long" in str(answer) and spool.messages == {}


def test_names_are_unique_and_checked(tmp_path):
    path = str(tmp_path / "tokens")
    T.add_token(path, "a")
    with pytest.raises(ValueError, match="already"):
        T.add_token(path, "a")
    for bad in ("", "has space", "x:y", "POSTMARK_API_TEST", "-dash"):
        with pytest.raises(ValueError):
            T.add_token(path, bad)
    with pytest.raises(ValueError, match="scope"):
        T.add_token(path, "b", ("root",))


@pytest.mark.parametrize("line,why,number", [
    ("nohash", "token name", 3),
    ("a:md5:abc", "sha256", 3),
    ("a:sha256:" + "0" * 64 + " scope=root", "unknown scope", 3),
    ("a:sha256:" + "0" * 64 + " colour=red", "unknown option", 3),
    ("a:sha256:" + "0" * 64 + "\na:sha256:" + "1" * 64, "twice", 4),
])
def test_bad_lines_name_file_and_line(line, why, number):
    with pytest.raises(T.TokenFileError, match=why) as e:
        T.parse("# comment\n\n" + line, "/etc/txmta/api-tokens")
    assert f"/etc/txmta/api-tokens:{number}:" in str(e.value)


def test_options_parse():
    digest = "sha256:" + "a" * 64
    tokens = T.parse(f"ci:{digest}  test lane=bulk domains=Example.org,b.example.\n", "f")
    t = tokens[digest]
    assert t.test and t.lane == "bulk" and t.domains == ("example.org", "b.example")
    assert t.scopes == {"send"}
    assert t.may_send_from("example.org") and t.may_send_from("mail.EXAMPLE.org")
    assert not t.may_send_from("notexample.org") and not t.may_send_from("org")


def test_store_rereads_a_changed_file_at_most_once_a_second(tmp_path):
    path = str(tmp_path / "tokens")
    now = [100.0]
    first = T.add_token(path, "first")
    store = T.TokenStore(path, lambda: now[0])
    second = T.add_token(path, "second")
    os.utime(path, ns=(1, 2))                         # a different mtime whatever the clock
    assert store.check(second) is None                # looked at less than a second ago
    now[0] += 1.5
    assert store.check(second).name == "second"
    # a broken file keeps the previous tokens
    with open(path, "a") as f:
        f.write("broken line\n")
    now[0] += 1.5
    assert store.check(first).name == "first"


def test_missing_file_at_start_is_an_error(tmp_path):
    with pytest.raises(T.TokenFileError):
        T.TokenStore(str(tmp_path / "missing"), lambda: 0.0)


@given(st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200))
def test_rate_limiter_never_admits_more_than_burst_plus_rate_times_time(gaps):
    limiter = T.RateLimiter(10)
    now, admitted = 0.0, 0
    for gap in gaps:
        now += gap
        wait = limiter.take("t", now)
        assert wait >= 0
        if wait == 0:
            admitted += 1
    assert admitted <= 10 + 10 * now + 1e-6


def test_rate_limiter_waits_and_then_admits():
    limiter = T.RateLimiter(2)
    assert limiter.take("t", 0.0) == 0 and limiter.take("t", 0.0) == 0
    wait = limiter.take("t", 0.0)
    assert wait == pytest.approx(0.5)
    assert limiter.take("t", 0.5) == 0
    assert limiter.take("other", 0.5) == 0            # per token
    assert T.RateLimiter(0).take("t", 0.0) == 0        # 0 = no limit


def test_cli_api_token(tmp_path, capsys):
    path = tmp_path / "tokens"
    assert cli.main(["api-token", "app", "--file", str(path), "--domain", "Example.com",
                     "--scope", "send", "--scope", "dashboard", "--test"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert "shown only now" in err
    found = T.TokenStore(str(path), lambda: 0.0).check(token)
    assert found.name == "app" and found.test and found.domains == ("example.com",)
    assert found.scopes == {"send", "dashboard"}
    assert cli.main(["api-token", "app", "--file", str(path)]) == 1
    assert "already" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    assert cli.main(["api-token", "x", "--config", str(cfg)]) == 1
    assert "[api] tokens" in capsys.readouterr().err


def test_check_config_reads_the_tokens_file(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    import socket
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cfg.write_text(f'[[http]]\naddress = "127.0.0.1:{ports[0]}"\n[api]\ntokens = "{tmp_path}/tokens"\n'
                   f'[[listen]]\naddress = "127.0.0.1:{ports[1]}"\n')
    assert cli.main(["check-config", str(cfg)]) == 1
    assert "api.tokens" in capsys.readouterr().err
    (tmp_path / "tokens").write_text("bad line here\n")
    assert cli.main(["check-config", str(cfg)]) == 1
    assert "tokens:1:" in capsys.readouterr().err
    (tmp_path / "tokens").write_text("")
    assert cli.main(["check-config", str(cfg)]) == 0
