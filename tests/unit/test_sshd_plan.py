"""Tables for the pure sshd_config planning in roles/config/sshd.py: facts in, exact bytes out.

Every expected file below was also checked against OpenSSH 9.2's own parser (`sshd -T`,
run by hand in a private mount namespace): before the edit it reports `current`, after
the edit it reports the wanted value for a connection that matches no Match block.
"""

from dataclasses import dataclass

import pytest

from roles.config.sshd import (
    Decider,
    MatchOverride,
    SshdFacts,
    SshdPlan,
    find_match_overrides,
    find_permit_root_login,
    plan_permit_root_login,
    sshd_T_args,
)
from roles.core.sshd_output import parse_sshd_T, parse_sshd_T_multi

MAIN = "/etc/ssh/sshd_config"
DROPINS = "/etc/ssh/sshd_config.d/*.conf"
CLOUD = "/etc/ssh/sshd_config.d/50-cloud.conf"
FCO = "forced-commands-only"

# /usr/share/openssh/sshd_config from Debian 12's openssh-server 1:9.2p1-2+deb12u10.
DEBIAN_12_SSHD_CONFIG = b"""\

# This is the sshd server system-wide configuration file.  See
# sshd_config(5) for more information.

# This sshd was compiled with PATH=/usr/local/bin:/usr/bin:/bin:/usr/games

# The strategy used for options in the default sshd_config shipped with
# OpenSSH is to specify options with their default value where
# possible, but leave them commented.  Uncommented options override the
# default value.

Include /etc/ssh/sshd_config.d/*.conf

#Port 22
#AddressFamily any
#ListenAddress 0.0.0.0
#ListenAddress ::

#HostKey /etc/ssh/ssh_host_rsa_key
#HostKey /etc/ssh/ssh_host_ecdsa_key
#HostKey /etc/ssh/ssh_host_ed25519_key

# Ciphers and keying
#RekeyLimit default none

# Logging
#SyslogFacility AUTH
#LogLevel INFO

# Authentication:

#LoginGraceTime 2m
#PermitRootLogin prohibit-password
#StrictModes yes
#MaxAuthTries 6
#MaxSessions 10

#PubkeyAuthentication yes

# Expect .ssh/authorized_keys2 to be disregarded by default in future.
#AuthorizedKeysFile\t.ssh/authorized_keys .ssh/authorized_keys2

#AuthorizedPrincipalsFile none

#AuthorizedKeysCommand none
#AuthorizedKeysCommandUser nobody

# For this to work you will also need host keys in /etc/ssh/ssh_known_hosts
#HostbasedAuthentication no
# Change to yes if you don't trust ~/.ssh/known_hosts for
# HostbasedAuthentication
#IgnoreUserKnownHosts no
# Don't read the user's ~/.rhosts and ~/.shosts files
#IgnoreRhosts yes

# To disable tunneled clear text passwords, change to no here!
#PasswordAuthentication yes
#PermitEmptyPasswords no

# Change to yes to enable challenge-response passwords (beware issues with
# some PAM modules and threads)
KbdInteractiveAuthentication no

# Kerberos options
#KerberosAuthentication no
#KerberosOrLocalPasswd yes
#KerberosTicketCleanup yes
#KerberosGetAFSToken no

# GSSAPI options
#GSSAPIAuthentication no
#GSSAPICleanupCredentials yes
#GSSAPIStrictAcceptorCheck yes
#GSSAPIKeyExchange no

# Set this to 'yes' to enable PAM authentication, account processing,
# and session processing. If this is enabled, PAM authentication will
# be allowed through the KbdInteractiveAuthentication and
# PasswordAuthentication.  Depending on your PAM configuration,
# PAM authentication via KbdInteractiveAuthentication may bypass
# the setting of "PermitRootLogin prohibit-password".
# If you just want the PAM account and session checks to run without
# PAM authentication, then enable this but set PasswordAuthentication
# and KbdInteractiveAuthentication to 'no'.
UsePAM yes

#AllowAgentForwarding yes
#AllowTcpForwarding yes
#GatewayPorts no
X11Forwarding yes
#X11DisplayOffset 10
#X11UseLocalhost yes
#PermitTTY yes
PrintMotd no
#PrintLastLog yes
#TCPKeepAlive yes
#PermitUserEnvironment no
#Compression delayed
#ClientAliveInterval 0
#ClientAliveCountMax 3
#UseDNS no
#PidFile /run/sshd.pid
#MaxStartups 10:30:100
#PermitTunnel no
#ChrootDirectory none
#VersionAddendum none

# no default banner path
#Banner none

# Allow client to pass locale environment variables
AcceptEnv LANG LC_*

# override default of no subsystems
Subsystem\tsftp\t/usr/lib/openssh/sftp-server

# Example of overriding settings on a per-user basis
#Match User anoncvs
#\tX11Forwarding no
#\tAllowTcpForwarding no
#\tPermitTTY no
#\tForceCommand cvs server
"""
DEBIAN_12_COMMENT = b"#PermitRootLogin prohibit-password\n"
DEBIAN_12_PLANNED = DEBIAN_12_SSHD_CONFIG.replace(
    DEBIAN_12_COMMENT, DEBIAN_12_COMMENT + b"PermitRootLogin forced-commands-only\n"
)
DEBIAN_12_INCLUDES = {DROPINS: []}

# A small Debian-shaped main file: Include at the top, then the commented default.
DEBIANISH = (
    b"Include /etc/ssh/sshd_config.d/*.conf\n"
    b"\n"
    b"#LoginGraceTime 2m\n"
    b"#PermitRootLogin prohibit-password\n"
    b"#StrictModes yes\n"
    b"UsePAM yes\n"
)


def match_warning(where: str, match_line: str, value: str) -> str:
    return (
        f"{where}: `{match_line}` sets PermitRootLogin {value}; it may override the "
        f"global value for the connections it matches"
    )


@dataclass(frozen=True)
class Case:
    files: dict[str, bytes]
    includes: dict[str, list[str]]
    want: str
    path: str | None  # the file the plan changes; None: no change
    new: bytes | None
    current: str | None
    warnings: tuple[str, ...] = ()


PLAN_CASES = {
    # --- Debian 12 ------------------------------------------------------------------------
    "debian12-default-no-dropins": Case(
        {MAIN: DEBIAN_12_SSHD_CONFIG}, DEBIAN_12_INCLUDES, FCO, MAIN, DEBIAN_12_PLANNED, None
    ),
    "debian12-default-comment-only-dropin": Case(
        {MAIN: DEBIAN_12_SSHD_CONFIG, CLOUD: b"# PermitRootLogin yes\n"},
        {DROPINS: [CLOUD]},
        FCO,
        MAIN,
        DEBIAN_12_PLANNED,
        None,
    ),
    "debian12-dropin-50-cloud-yes": Case(
        {MAIN: DEBIAN_12_SSHD_CONFIG, CLOUD: b"PasswordAuthentication no\nPermitRootLogin yes\n"},
        {DROPINS: [CLOUD]},
        FCO,
        CLOUD,
        b"PasswordAuthentication no\nPermitRootLogin forced-commands-only\n",
        "yes",
    ),
    "debianish-inserted-after-commented-default": Case(
        {MAIN: DEBIANISH},
        {DROPINS: []},
        FCO,
        MAIN,
        b"Include /etc/ssh/sshd_config.d/*.conf\n"
        b"\n"
        b"#LoginGraceTime 2m\n"
        b"#PermitRootLogin prohibit-password\n"
        b"PermitRootLogin forced-commands-only\n"
        b"#StrictModes yes\n"
        b"UsePAM yes\n",
        None,
    ),
    # --- an active global line ----------------------------------------------------------
    "active-yes-replaced": Case(
        {MAIN: b"Port 22\nPermitRootLogin yes\nUsePAM yes\n"},
        {},
        FCO,
        MAIN,
        b"Port 22\nPermitRootLogin forced-commands-only\nUsePAM yes\n",
        "yes",
    ),
    "already-wanted-no-change": Case(
        {MAIN: b"Port 22\nPermitRootLogin forced-commands-only\n"}, {}, FCO, None, None, FCO
    ),
    "already-wanted-other-case-no-change": Case(
        {MAIN: b"PERMITROOTLOGIN Forced-Commands-Only\n"},
        {},
        FCO,
        None,
        None,
        "Forced-Commands-Only",
    ),
    "lowercase-keyword-equals-separator": Case(
        {MAIN: b"permitrootlogin=no\n"},
        {},
        FCO,
        MAIN,
        b"permitrootlogin=forced-commands-only\n",
        "no",
    ),
    "spaced-equals-indent-trailing-comment-dropped": Case(
        {MAIN: b"  PermitRootLogin = yes # set by hand\nUsePAM yes\n"},
        {},
        FCO,
        MAIN,
        b"  PermitRootLogin = forced-commands-only\nUsePAM yes\n",
        "yes",
    ),
    "tab-separator-quoted-value": Case(
        {MAIN: b'\tPermitRootLogin\t"yes"\n'},
        {},
        FCO,
        MAIN,
        b"\tPermitRootLogin\tforced-commands-only\n",
        "yes",
    ),
    "two-active-first-decides-only-it-changes": Case(
        {MAIN: b"PermitRootLogin no\nUsePAM yes\nPermitRootLogin yes\n"},
        {},
        FCO,
        MAIN,
        b"PermitRootLogin forced-commands-only\nUsePAM yes\nPermitRootLogin yes\n",
        "no",
    ),
    "want-no-replaces-yes": Case(
        {MAIN: b"PermitRootLogin yes\n"}, {}, "no", MAIN, b"PermitRootLogin no\n", "yes"
    ),
    "want-written-lower-case": Case(
        {MAIN: b"PermitRootLogin yes\n"},
        {},
        "Forced-Commands-Only",
        MAIN,
        b"PermitRootLogin forced-commands-only\n",
        "yes",
    ),
    "without-password-is-prohibit-password": Case(
        {MAIN: b"PermitRootLogin without-password\n"},
        {},
        "prohibit-password",
        None,
        None,
        "without-password",
    ),
    # --- Match blocks --------------------------------------------------------------------
    "only-in-match-at-end-inserted-before-match": Case(
        {MAIN: b"UsePAM yes\n\nMatch Address 10.0.0.0/8\n    PermitRootLogin yes\n"},
        {},
        FCO,
        MAIN,
        b"UsePAM yes\nPermitRootLogin forced-commands-only\n\n"
        b"Match Address 10.0.0.0/8\n    PermitRootLogin yes\n",
        None,
        (match_warning(f"{MAIN}:4", "Match Address 10.0.0.0/8", "yes"),),
    ),
    "match-right-after-global-line-gets-blank-line": Case(
        {MAIN: b"UsePAM yes\nMatch User bob\n\tPermitRootLogin no\n"},
        {},
        FCO,
        MAIN,
        b"UsePAM yes\nPermitRootLogin forced-commands-only\n\nMatch User bob\n\tPermitRootLogin no\n",
        None,
        (match_warning(f"{MAIN}:3", "Match User bob", "no"),),
    ),
    "match-first-line-of-file": Case(
        {MAIN: b"Match User bob\n\tPermitRootLogin yes\n"},
        {},
        FCO,
        MAIN,
        b"PermitRootLogin forced-commands-only\n\nMatch User bob\n\tPermitRootLogin yes\n",
        None,
        (match_warning(f"{MAIN}:2", "Match User bob", "yes"),),
    ),
    "comment-above-match-stays-with-match": Case(
        {MAIN: b"UsePAM yes\n\n# sftp only\nMatch Group sftp\n\tForceCommand internal-sftp\n"},
        {},
        FCO,
        MAIN,
        b"UsePAM yes\nPermitRootLogin forced-commands-only\n\n"
        b"# sftp only\nMatch Group sftp\n\tForceCommand internal-sftp\n",
        None,
    ),
    "commented-default-after-match-not-used": Case(
        {
            MAIN: b"UsePAM yes\n\nMatch User bob\n#PermitRootLogin prohibit-password\nPermitRootLogin yes\n"
        },
        {},
        FCO,
        MAIN,
        b"UsePAM yes\nPermitRootLogin forced-commands-only\n\n"
        b"Match User bob\n#PermitRootLogin prohibit-password\nPermitRootLogin yes\n",
        None,
        (match_warning(f"{MAIN}:5", "Match User bob", "yes"),),
    ),
    "commented-default-before-match-used": Case(
        {
            MAIN: b"#PermitRootLogin prohibit-password\nUsePAM yes\nMatch User backup\n  PermitRootLogin no\n"
        },
        {},
        FCO,
        MAIN,
        b"#PermitRootLogin prohibit-password\nPermitRootLogin forced-commands-only\n"
        b"UsePAM yes\nMatch User backup\n  PermitRootLogin no\n",
        None,
        (match_warning(f"{MAIN}:4", "Match User backup", "no"),),
    ),
    "match-value-equal-to-want-no-warning": Case(
        {MAIN: b"PermitRootLogin yes\nMatch User backup\n\tPermitRootLogin forced-commands-only\n"},
        {},
        FCO,
        MAIN,
        b"PermitRootLogin forced-commands-only\n"
        b"Match User backup\n\tPermitRootLogin forced-commands-only\n",
        "yes",
    ),
    "match-all-returns-to-global": Case(
        {MAIN: b"Match User bob\n\tX11Forwarding no\nMatch all\nPermitRootLogin yes\n"},
        {},
        FCO,
        MAIN,
        b"Match User bob\n\tX11Forwarding no\nMatch all\nPermitRootLogin forced-commands-only\n",
        "yes",
    ),
    # sshd re-applies Match blocks per connection: `sshd -T` prints yes here, not no.
    "match-all-line-beats-earlier-global-line": Case(
        {MAIN: b"PermitRootLogin no\nMatch all\nPermitRootLogin yes\n"},
        {},
        FCO,
        MAIN,
        b"PermitRootLogin no\nMatch all\nPermitRootLogin forced-commands-only\n",
        "yes",
    ),
    # --- Include and drop-ins ------------------------------------------------------------
    "dropin-50-cloud-yes-changed-not-main": Case(
        {
            MAIN: b"Include /etc/ssh/sshd_config.d/*.conf\n"
            b"#PermitRootLogin prohibit-password\nPermitRootLogin no\n",
            CLOUD: b"PermitRootLogin yes\n",
        },
        {DROPINS: [CLOUD]},
        FCO,
        CLOUD,
        b"PermitRootLogin forced-commands-only\n",
        "yes",
    ),
    "dropin-wanted-main-no-no-change": Case(
        {
            MAIN: b"Include /etc/ssh/sshd_config.d/*.conf\nPermitRootLogin no\n",
            CLOUD: b"PermitRootLogin forced-commands-only\n",
        },
        {DROPINS: [CLOUD]},
        FCO,
        None,
        None,
        FCO,
    ),
    "dropins-read-in-byte-order-whatever-the-shell-gave": Case(
        {
            MAIN: b"Include /etc/ssh/sshd_config.d/*.conf\n",
            "/etc/ssh/sshd_config.d/10-a.conf": b"PermitRootLogin no\n",
            "/etc/ssh/sshd_config.d/Z-b.conf": b"PermitRootLogin yes\n",
        },
        {DROPINS: ["/etc/ssh/sshd_config.d/10-a.conf", "/etc/ssh/sshd_config.d/Z-b.conf"][::-1]},
        FCO,
        "/etc/ssh/sshd_config.d/10-a.conf",
        b"PermitRootLogin forced-commands-only\n",
        "no",
    ),
    "include-after-main-line-loses": Case(
        {
            MAIN: b"PermitRootLogin no\nInclude /etc/ssh/sshd_config.d/*.conf\n",
            CLOUD: b"PermitRootLogin yes\n",
        },
        {DROPINS: [CLOUD]},
        FCO,
        MAIN,
        b"PermitRootLogin forced-commands-only\nInclude /etc/ssh/sshd_config.d/*.conf\n",
        "no",
    ),
    "include-relative-path": Case(
        {
            MAIN: b"Include local.d/*.conf\nPermitRootLogin no\n",
            "/etc/ssh/local.d/10-root.conf": b"PermitRootLogin yes\n",
        },
        {"local.d/*.conf": ["/etc/ssh/local.d/10-root.conf"]},
        FCO,
        "/etc/ssh/local.d/10-root.conf",
        b"PermitRootLogin forced-commands-only\n",
        "yes",
    ),
    "include-relative-path-globbed-over-files-when-not-in-includes": Case(
        {
            MAIN: b"Include local.d/*.conf\nPermitRootLogin no\n",
            "/etc/ssh/local.d/.hidden.conf": b"PermitRootLogin without-password\n",
            "/etc/ssh/local.d/sub/deep.conf": b"PermitRootLogin without-password\n",
            "/etc/ssh/local.d/10-root.conf": b"PermitRootLogin yes\n",
        },
        {},
        FCO,
        "/etc/ssh/local.d/10-root.conf",
        b"PermitRootLogin forced-commands-only\n",
        "yes",
    ),
    "include-inside-match-is-not-global": Case(
        {
            MAIN: b"Port 22\nMatch Group admins\n\tInclude admins.conf\n",
            "/etc/ssh/admins.conf": b"PermitRootLogin yes\n",
        },
        {"admins.conf": ["/etc/ssh/admins.conf"]},
        FCO,
        MAIN,
        b"Port 22\nPermitRootLogin forced-commands-only\n\nMatch Group admins\n\tInclude admins.conf\n",
        None,
        (match_warning("/etc/ssh/admins.conf:1", "Match Group admins", "yes"),),
    ),
    "match-all-in-file-included-from-match-stays-conditional": Case(
        {
            MAIN: b"Port 22\nMatch Group admins\n\tInclude admins.conf\n",
            "/etc/ssh/admins.conf": b"X11Forwarding no\nMatch all\nPermitRootLogin yes\n",
        },
        {"admins.conf": ["/etc/ssh/admins.conf"]},
        FCO,
        MAIN,
        b"Port 22\nPermitRootLogin forced-commands-only\n\nMatch Group admins\n\tInclude admins.conf\n",
        None,
        (match_warning("/etc/ssh/admins.conf:3", "Match Group admins", "yes"),),
    ),
    "match-in-dropin-ends-with-the-dropin": Case(
        {
            MAIN: b"Include /etc/ssh/sshd_config.d/*.conf\nPermitRootLogin no\n",
            CLOUD: b"Match User bob\n\tPermitRootLogin yes\n",
        },
        {DROPINS: [CLOUD]},
        FCO,
        MAIN,
        b"Include /etc/ssh/sshd_config.d/*.conf\nPermitRootLogin forced-commands-only\n",
        "no",
        (match_warning(f"{CLOUD}:2", "Match User bob", "yes"),),
    ),
    # --- bytes: line ends, final newline, non-UTF-8 --------------------------------------
    "crlf-replaced-line-keeps-crlf": Case(
        {MAIN: b"Port 22\r\nPermitRootLogin yes\r\nUsePAM yes\r\n"},
        {},
        FCO,
        MAIN,
        b"Port 22\r\nPermitRootLogin forced-commands-only\r\nUsePAM yes\r\n",
        "yes",
    ),
    "crlf-inserted-line-uses-crlf": Case(
        {MAIN: b"Port 22\r\n#PermitRootLogin prohibit-password\r\nUsePAM yes\r\n"},
        {},
        FCO,
        MAIN,
        b"Port 22\r\n#PermitRootLogin prohibit-password\r\n"
        b"PermitRootLogin forced-commands-only\r\nUsePAM yes\r\n",
        None,
    ),
    "crlf-no-final-newline-appended": Case(
        {MAIN: b"Port 22\r\nUsePAM yes"},
        {},
        FCO,
        MAIN,
        b"Port 22\r\nUsePAM yes\r\nPermitRootLogin forced-commands-only\r\n",
        None,
    ),
    "no-final-newline-appended": Case(
        {MAIN: b"Port 22\nUsePAM yes"},
        {},
        FCO,
        MAIN,
        b"Port 22\nUsePAM yes\nPermitRootLogin forced-commands-only\n",
        None,
    ),
    "no-final-newline-last-line-replaced-stays-without": Case(
        {MAIN: b"Port 22\nPermitRootLogin yes"},
        {},
        FCO,
        MAIN,
        b"Port 22\nPermitRootLogin forced-commands-only",
        "yes",
    ),
    "no-final-newline-after-commented-default": Case(
        {MAIN: b"Port 22\n#PermitRootLogin prohibit-password"},
        {},
        FCO,
        MAIN,
        b"Port 22\n#PermitRootLogin prohibit-password\nPermitRootLogin forced-commands-only\n",
        None,
    ),
    "empty-main-file": Case(
        {MAIN: b""}, {}, FCO, MAIN, b"PermitRootLogin forced-commands-only\n", None
    ),
    "non-utf8-bytes-survive-replace": Case(
        {MAIN: b"# caf\xe9 \xff\r\nBanner /etc/issue.\xe9\nPermitRootLogin yes\n# \x80 end\n"},
        {},
        FCO,
        MAIN,
        b"# caf\xe9 \xff\r\nBanner /etc/issue.\xe9\nPermitRootLogin forced-commands-only\n# \x80 end\n",
        "yes",
    ),
    "non-utf8-bytes-survive-insert": Case(
        {MAIN: b"#PermitRootLogin prohibit-password \xe9\nBanner /etc/issue.\xff\n"},
        {},
        FCO,
        MAIN,
        b"#PermitRootLogin prohibit-password \xe9\nPermitRootLogin forced-commands-only\n"
        b"Banner /etc/issue.\xff\n",
        None,
    ),
}


def facts_for(case: Case) -> SshdFacts:
    return SshdFacts(main_path=MAIN, files=dict(case.files), includes=dict(case.includes))


@pytest.mark.parametrize("case", PLAN_CASES.values(), ids=PLAN_CASES.keys())
def test_plan_permit_root_login(case: Case) -> None:
    plan = plan_permit_root_login(facts_for(case), want=case.want)

    assert (plan.path, plan.new, plan.current, plan.warnings) == (
        case.path,
        case.new,
        case.current,
        case.warnings,
    )
    if case.path is None:
        assert (plan.old, plan.changed, plan.diff()) == (None, False, "")
    else:
        assert plan.old == case.files[case.path]
        assert plan.changed is True
        assert plan.diff().startswith(f"--- a{case.path}\n+++ b{case.path}\n")


def test_debian12_literal_has_one_commented_default() -> None:
    # DEBIAN_12_PLANNED is built with replace(): make sure it inserted exactly one line.
    assert DEBIAN_12_SSHD_CONFIG.count(DEBIAN_12_COMMENT) == 1
    assert len(DEBIAN_12_PLANNED) - len(DEBIAN_12_SSHD_CONFIG) == len(
        b"PermitRootLogin forced-commands-only\n"
    )
    assert DEBIAN_12_SSHD_CONFIG.startswith(b"\n# This is the sshd server system-wide")


@pytest.mark.parametrize(
    ("files", "includes", "expected"),
    [
        pytest.param({MAIN: b"Port 22\n"}, {}, None, id="unset"),
        pytest.param(
            {MAIN: b"Port 22\n  permitrootlogin = yes\n"},
            {},
            Decider(MAIN, 1, "yes"),
            id="main",
        ),
        pytest.param(
            {
                MAIN: b"Include /etc/ssh/sshd_config.d/*.conf\nPermitRootLogin no\n",
                CLOUD: b"\nPermitRootLogin yes\n",
            },
            {DROPINS: [CLOUD]},
            Decider(CLOUD, 1, "yes"),
            id="dropin",
        ),
        pytest.param(
            {MAIN: b"Match User bob\nPermitRootLogin yes\n"}, {}, None, id="only-in-match"
        ),
        pytest.param(
            {MAIN: b"PermitRootLogin no\nMatch all\nPermitRootLogin yes\nPermitRootLogin no\n"},
            {},
            Decider(MAIN, 2, "yes"),
            id="first-match-all-line",
        ),
    ],
)
def test_find_permit_root_login(
    files: dict[str, bytes], includes: dict[str, list[str]], expected: Decider | None
) -> None:
    assert find_permit_root_login(SshdFacts(MAIN, files, includes)) == expected


def test_find_match_overrides_in_reading_order() -> None:
    facts = SshdFacts(
        MAIN,
        {
            MAIN: b"Include /etc/ssh/sshd_config.d/*.conf\nPermitRootLogin no\n"
            b"Match Address 10.0.0.0/8\n  Include admins.conf\n"
            b"  PermitRootLogin yes\nMatch all\nPermitRootLogin prohibit-password\n",
            CLOUD: b"Match User bob\n\tPermitRootLogin=no\n",
            "/etc/ssh/admins.conf": b"Match Group wheel\nPermitRootLogin without-password\n",
        },
        {DROPINS: [CLOUD], "admins.conf": ["/etc/ssh/admins.conf"]},
    )

    assert find_match_overrides(facts) == [
        MatchOverride(CLOUD, 1, "Match User bob", "no"),
        MatchOverride(
            "/etc/ssh/admins.conf",
            1,
            "Match Address 10.0.0.0/8 / Match Group wheel",
            "without-password",
        ),
        MatchOverride(MAIN, 4, "Match Address 10.0.0.0/8", "yes"),
    ]


def test_diff_is_unified_with_a_b_names() -> None:
    facts = SshdFacts(MAIN, {MAIN: b"Port 22\nPermitRootLogin yes\n"}, {})

    assert plan_permit_root_login(facts).diff() == (
        "--- a/etc/ssh/sshd_config\n"
        "+++ b/etc/ssh/sshd_config\n"
        "@@ -1,2 +1,2 @@\n"
        " Port 22\n"
        "-PermitRootLogin yes\n"
        "+PermitRootLogin forced-commands-only\n"
    )


def test_diff_marks_missing_final_newline_and_escapes_bad_bytes() -> None:
    facts = SshdFacts(MAIN, {MAIN: b"Banner /etc/issue.\xe9\nUsePAM yes"}, {})

    assert plan_permit_root_login(facts).diff() == (
        "--- a/etc/ssh/sshd_config\n"
        "+++ b/etc/ssh/sshd_config\n"
        "@@ -1,2 +1,3 @@\n"
        " Banner /etc/issue.\\xe9\n"
        "-UsePAM yes\n"
        "\\ No newline at end of file\n"
        "+UsePAM yes\n"
        "+PermitRootLogin forced-commands-only\n"
    )


def test_plan_changed_property() -> None:
    assert SshdPlan(MAIN, b"a\n", b"b\n", None, ()).changed is True
    assert SshdPlan(MAIN, b"a\n", b"a\n", None, ()).changed is False
    assert SshdPlan(None, None, None, "yes", ()).changed is False


@pytest.mark.parametrize(
    "want",
    ["", "maybe", "yes no", "forced-commands-only\n", "prohibit_password", " yes"],
)
def test_invalid_want_raises(want: str) -> None:
    facts = SshdFacts(MAIN, {MAIN: b"PermitRootLogin yes\n"}, {})

    with pytest.raises(ValueError, match="is not one of"):
        plan_permit_root_login(facts, want=want)


@pytest.mark.parametrize(
    ("files", "includes", "message"),
    [
        pytest.param(
            {MAIN: b"Include /etc/ssh/sshd_config.d/*.conf\n"},
            {DROPINS: [CLOUD]},
            "facts lack the content of /etc/ssh/sshd_config.d/50-cloud.conf",
            id="included-file-missing-from-facts",
        ),
        pytest.param({}, {}, "facts lack the content of /etc/ssh/sshd_config", id="no-main"),
        pytest.param(
            {MAIN: b"Include sshd_config\n"},
            {"sshd_config": [MAIN]},
            "Include nesting deeper than 16",
            id="include-loop",
        ),
    ],
)
def test_incomplete_or_looping_facts_raise(
    files: dict[str, bytes], includes: dict[str, list[str]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_permit_root_login(SshdFacts(MAIN, files, includes))


SSHD_T_OUTPUT = (
    "port 22\n"
    "addressfamily any\n"
    "listenaddress [::]:22\n"
    "listenaddress 0.0.0.0:22\n"
    "permitrootlogin forced-commands-only\n"
    "/etc/ssh/sshd_config line 3: Deprecated option UsePrivilegeSeparation\n"
    "\n"
    "subsystem sftp /usr/lib/openssh/sftp-server\n"
    "authorizedkeysfile .ssh/authorized_keys .ssh/authorized_keys2\n"
    "banner none\n"
    "permitrootlogin yes\n"
)


def test_parse_sshd_T_keeps_first_value() -> None:
    assert parse_sshd_T(SSHD_T_OUTPUT) == {
        "port": "22",
        "addressfamily": "any",
        "listenaddress": "[::]:22",
        "permitrootlogin": "forced-commands-only",
        "subsystem": "sftp /usr/lib/openssh/sftp-server",
        "authorizedkeysfile": ".ssh/authorized_keys .ssh/authorized_keys2",
        "banner": "none",
    }


def test_parse_sshd_T_multi_keeps_every_value() -> None:
    assert parse_sshd_T_multi(SSHD_T_OUTPUT) == {
        "port": ["22"],
        "addressfamily": ["any"],
        "listenaddress": ["[::]:22", "0.0.0.0:22"],
        "permitrootlogin": ["forced-commands-only", "yes"],
        "subsystem": ["sftp /usr/lib/openssh/sftp-server"],
        "authorizedkeysfile": [".ssh/authorized_keys .ssh/authorized_keys2"],
        "banner": ["none"],
    }


def test_parse_sshd_T_empty_and_crlf() -> None:
    assert parse_sshd_T("") == {}
    assert parse_sshd_T("port 22\r\npermitrootlogin no\r\n") == {
        "port": "22",
        "permitrootlogin": "no",
    }


@pytest.mark.parametrize(
    ("user", "host", "addr", "expected"),
    [
        pytest.param(
            "root",
            "backup.example.org",
            "192.0.2.10",
            ["sshd", "-T", "-C", "user=root,host=backup.example.org,addr=192.0.2.10"],
            id="ipv4",
        ),
        pytest.param(
            "root",
            "backup",
            "2001:db8::10",
            ["sshd", "-T", "-C", "user=root,host=backup,addr=2001:db8::10"],
            id="ipv6",
        ),
    ],
)
def test_sshd_T_args(user: str, host: str, addr: str, expected: list[str]) -> None:
    assert sshd_T_args(user, host, addr) == expected


@pytest.mark.parametrize(
    ("user", "host", "addr"),
    [
        pytest.param("root,user=bob", "h", "192.0.2.10", id="comma-in-user"),
        pytest.param("root", "h x", "192.0.2.10", id="space-in-host"),
        pytest.param("root", "h", "192.0.2.10,addr=10.0.0.1", id="comma-in-addr"),
        pytest.param("root", "h=x", "192.0.2.10", id="equals-in-host"),
        pytest.param("root", "h", "192.0.2.10\n", id="newline-in-addr"),
        pytest.param("root\t", "h", "192.0.2.10", id="tab-in-user"),
        pytest.param("", "h", "192.0.2.10", id="empty-user"),
    ],
)
def test_sshd_T_args_rejects_unsafe_values(user: str, host: str, addr: str) -> None:
    with pytest.raises(ValueError):
        sshd_T_args(user, host, addr)
