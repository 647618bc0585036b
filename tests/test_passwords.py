"""AUTH password hashes verify, reject and parse as promised; the users file names bad lines."""

import pytest

from txmta.config import ConfigError
from txmta.passwords import hash_password, load_users, verify_password


def test_hash_has_documented_format_and_verifies():
    """A new hash is `scrypt$14$8$1$salt$key` and verifies with the same password only."""
    encoded = hash_password("s3cret")
    assert encoded.startswith("scrypt$14$8$1$")
    assert len(encoded.split("$")) == 6
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)
    assert not verify_password("", encoded)


def test_same_password_gets_a_fresh_salt():
    """Two hashes of one password differ (random salt), and both verify."""
    a, b = hash_password("pw"), hash_password("pw")
    assert a != b
    assert verify_password("pw", a) and verify_password("pw", b)


def test_non_ascii_password_round_trips():
    """Passwords are hashed as UTF-8."""
    assert verify_password("pässwörd✓", hash_password("pässwörd✓"))


@pytest.mark.parametrize("encoded", [
    "",
    "plain",
    "bcrypt$14$8$1$AAAA$AAAA",
    "scrypt$14$8$1$!!!!$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    "scrypt$x$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    "scrypt$40$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",  # too costly
    "scrypt$14$8$1$AAAAAAAAAAAAAAAAAAAAAA==",
])
def test_malformed_hash_never_verifies(encoded):
    """A malformed or unaffordable hash answers False instead of raising."""
    assert verify_password("anything", encoded) is False


def test_load_users_skips_comments_and_blank_lines(tmp_path):
    """`user:hash` lines are read; `#` comments and blank lines are skipped."""
    h = hash_password("pw")
    f = tmp_path / "users"
    f.write_text(f"# the users\n\nalice:{h}\n  # indented comment\nbob@example.org:{h}\n")
    users = load_users(str(f))
    assert users == {"alice": h, "bob@example.org": h}
    assert verify_password("pw", users["alice"])


@pytest.mark.parametrize("line, reason", [
    ("alice", "user:hash"),
    (":scrypt$14$8$1$AAAA$AAAA", "user:hash"),
    ("alice:secret", "not a scrypt hash"),
])
def test_bad_users_line_names_file_and_line_number(tmp_path, line, reason):
    """A bad line raises ConfigError with `path:line:` and the reason."""
    f = tmp_path / "users"
    f.write_text(f"# header\n{line}\n")
    with pytest.raises(ConfigError) as e:
        load_users(str(f))
    assert str(e.value).startswith(f"{f}:2: ")
    assert reason in str(e.value)


def test_duplicate_user_is_an_error(tmp_path):
    """A user listed twice is refused rather than silently overridden."""
    h = hash_password("pw")
    f = tmp_path / "users"
    f.write_text(f"alice:{h}\nalice:{h}\n")
    with pytest.raises(ConfigError, match=r":2: user 'alice' is listed twice"):
        load_users(str(f))


def test_missing_users_file_is_a_config_error(tmp_path):
    """An unreadable users file raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_users(str(tmp_path / "nope"))
