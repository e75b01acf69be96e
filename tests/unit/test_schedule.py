"""roles.features.schedule: --at, offsets, quoting, golden files for every rendered format, unit-file
validity, and gather/plan/apply against a temporary root (no real /etc is touched).

Regenerate the golden files after a deliberate template change with
``UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_schedule.py`` and review the diff.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from roles.core.outcome import State
from roles.features import schedule as s

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
REPO = Path(__file__).resolve().parents[2]
PROGRAM = "/opt/pullback/.venv/bin/pullback-backup"
INVENTORY = "/etc/pullback/inventory.yaml"


def job(hosts=("web1", "db1"), **kwargs) -> s.Job:
    kwargs.setdefault("program", PROGRAM)
    return s.build_job(kwargs.pop("inventory", INVENTORY), hosts, **kwargs)


# --- --at, offsets, the command ---------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("02:30", (2, 30)), ("2:30", (2, 30)), ("00:00", (0, 0)), ("23:59", (23, 59)),
    (" 07:05 ", (7, 5)),
])
def test_parse_at_accepts_24_hour_times(text, want):
    assert s.parse_at(text) == want


@pytest.mark.parametrize("text", ["24:00", "12:60", "2:3", "0230", "2.30", "", "02:30:00",
                                  "-1:30", "02:30pm", "twelve"])
def test_parse_at_refuses_everything_else_in_one_line(text):
    with pytest.raises(s.ScheduleError) as info:
        s.parse_at(text)
    assert "\n" not in str(info.value) and "HH:MM" in str(info.value)


def test_the_offset_is_fixed_per_seed_and_inside_the_window():
    seeds = [f"backup{i} web{i}" for i in range(200)]
    offsets = [s.delay_offset(seed) for seed in seeds]
    assert offsets == [s.delay_offset(seed) for seed in seeds]
    assert all(0 <= o < s.DELAY_MINUTES for o in offsets)
    assert len(set(offsets)) > 20  # it does spread


@pytest.mark.parametrize("at, minutes, want", [
    ((2, 30), 0, (2, 30)), ((2, 30), 29, (2, 59)), ((2, 45), 20, (3, 5)),
    ((23, 50), 15, (0, 5)),
])
def test_shifted_wraps_at_midnight(at, minutes, want):
    assert s.shifted(at, minutes) == want


def test_build_job_runs_the_venv_pullback_backup_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    j = s.build_job("inv.yaml", ["web1", "db1", "web1"])
    assert j.argv == (str(Path(sys.executable).parent / "pullback-backup"),
                      "--inventory", str(tmp_path / "inv.yaml"), "--host", "web1", "--host",
                      "db1")
    assert j.hosts == ("web1", "db1")
    assert s.build_job("inv.yaml", []).what == f"every host in {tmp_path}/inv.yaml"


def test_build_job_passes_a_shard_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    j = s.build_job("inv.yaml", [], shard=" 2/3")
    assert j.argv[-2:] == ("--shard", "2/3")
    assert j.unit_argv == (j.argv[0], "--inventory", f"{tmp_path}/inv.yaml")
    assert j.instances == ("2-3",)
    with pytest.raises(ValueError, match="expected K/N"):
        s.build_job("inv.yaml", [], shard="2/3; rm -rf /")


@pytest.mark.parametrize("socket_path", ["run/agent.sock", "/run/a b.sock", "/run/x\n.sock",
                                         "/run/%t.sock", "/run/$HOME.sock"])
def test_agent_socket_must_be_a_plain_absolute_path(socket_path):
    with pytest.raises(s.ScheduleError):
        job(agent_socket=socket_path)


@pytest.mark.parametrize("arg, want", [
    ("/opt/pullback/.venv/bin/pullback-backup", "/opt/pullback/.venv/bin/pullback-backup"),
    ("--host", "--host"),
    ("/home/me/my inventory.yaml", '"/home/me/my inventory.yaml"'),
    ("/srv/50%.yaml", "/srv/50%%.yaml"),
    ("/srv/$HOME.yaml", "/srv/$$HOME.yaml"),
    ('/srv/a"b', '"/srv/a\\"b"'),
    ("/srv/a\\b", '"/srv/a\\\\b"'),
    (";", '";"'),
])
def test_systemd_words_are_quoted_and_escaped(arg, want):
    assert s.systemd_word(arg) == want


def test_a_plain_exec_line_splits_back_into_the_argv():
    j = job()
    assert shlex.split(s.systemd_exec(j.argv)) == list(j.argv)


def test_cron_escapes_percent_and_quotes_for_sh():
    j = job(inventory="/srv/my inv%.yaml", agent_socket="/run/user/0/agent.sock")
    command = s.cron_command(j)
    assert "'/srv/my inv\\%.yaml'" in command
    assert command.startswith(f"PATH={s.PATH_ENV} SSH_AUTH_SOCK=/run/user/0/agent.sock ")
    assert command.endswith(" >/dev/null")
    # What sh receives once cron has turned "\%" back into "%":
    words = shlex.split(command.replace("\\%", "%").removesuffix(" >/dev/null"))
    assert words[2:] == list(j.argv)


# --- golden files -----------------------------------------------------------------------------


def fleet_job(**kwargs) -> s.Job:
    """Shard 1 of 3 where db1 has its own unit; destinations below /backup/pullback."""
    return job(hosts=(), shard="1/3", own_units=("db1",),
               write_paths=("/backup/pullback", "/var/backups/pullback"), **kwargs)


def renderings() -> dict[str, str]:
    system, user = job(), job(hosts=(), agent_socket="/run/user/1000/pullback-agent.sock")
    return {
        "pullback-backup@.service": s.render_service(fleet_job(), system=True),
        "pullback-backup@1-3.timer": s.render_timer(fleet_job(), "1-3"),
        "pullback-failure@.service": s.render_failure(system=True),
        "pullback-backup@.user.service": s.render_service(user, system=False),
        "pullback-backup.cron": s.render_cron(system, system=True, hostname="backup1"),
        "pullback-backup.crontab": s.render_cron(user, system=False, hostname="backup1"),
        "io.pullback.backup.plist": s.render_plist(
            user, hostname="backup1", error_log="/Users/me/Library/Logs/pullback-backup.log"),
    }


@pytest.mark.parametrize("name", sorted(renderings()))
def test_rendered_files_match_the_golden_files(name):
    text = renderings()[name]
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from {path} (UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("name", sorted(renderings()))
def test_every_file_carries_the_marker_near_the_top(name):
    assert s.is_managed(renderings()[name])


def test_the_plist_is_a_valid_property_list_with_the_exact_argv():
    j = job(hosts=(), agent_socket="/run/user/1000/pullback-agent.sock")
    data = plistlib.loads(s.render_plist(j, hostname="backup1", error_log="/x.log").encode())
    hour, minute = s.shifted(j.at, s.delay_offset(s.seed_for("backup1", j)))
    assert data["Label"] == s.LABEL
    assert data["ProgramArguments"] == list(j.argv)
    assert data["StartCalendarInterval"] == {"Hour": hour, "Minute": minute}
    assert data["EnvironmentVariables"]["SSH_AUTH_SOCK"] == "/run/user/1000/pullback-agent.sock"


def test_xml_special_characters_and_dashes_survive_the_plist():
    j = job(hosts=(), inventory="/srv/a--b & <c>.yaml")
    data = plistlib.loads(s.render_plist(j, hostname="h", error_log="/x.log").encode())
    assert data["ProgramArguments"][2] == "/srv/a--b & <c>.yaml"


def test_the_cron_time_is_at_plus_the_fixed_offset():
    j = job(at="23:50")
    offset = s.delay_offset(s.seed_for("backup1", j))
    hour, minute = s.shifted((23, 50), offset)
    line = s.render_cron(j, system=True, hostname="backup1").splitlines()[-1]
    assert line.startswith(f"{minute} {hour} * * * root PATH=")


# --- unit files: systemd-analyze where available, else a small ini check ----------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A minimal systemd unit parser: sections, ``Key=value`` pairs, comments, nothing else."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            assert current not in sections, f"section [{current}] twice"
            sections[current] = []
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep and key and key == key.strip(), f"not Key=value: {line!r}"
        sections[current].append((key, value))
    return sections


def write_units(folder: Path, j: s.Job, *, system: bool) -> list[Path]:
    """The template, the failure template and the first instance's timer."""
    folder.mkdir(parents=True, exist_ok=True)
    service, timer = folder / s.TEMPLATE, folder / s.timer_name(j.instances[0])
    failure = folder / s.FAILURE
    service.write_text(s.render_service(j, system=system))
    timer.write_text(s.render_timer(j, j.instances[0]))
    failure.write_text(s.render_failure(system=system))
    return [service, timer, failure]


@pytest.mark.parametrize("system", [True, False], ids=["system", "user"])
def test_units_are_valid(tmp_path, system):
    """The units pass ``systemd-analyze verify`` WHERE IT IS INSTALLED (it needs no running
    systemd). Without the binary this test does not skip: it still checks the unit text with
    the small ini parser above (sections, keys, the values that matter)."""
    j = job(hosts=(), shard="1/3", own_units=("db1",),
            program=str(REPO / ".venv" / "bin" / "pullback-backup"),
            agent_socket=None if system else "/run/user/1000/pullback-agent.sock")
    assert j.instances == ("1-3", "db1")
    service, timer, failure = write_units(tmp_path / "units", j, system=system)

    units = {p.name: parse_unit(p.read_text()) for p in (service, timer, failure)}
    svc, tmr, fail = units[s.TEMPLATE], units["pullback-backup@1-3.timer"], units[s.FAILURE]
    assert set(svc) == {"Unit", "Service"} and set(tmr) == {"Unit", "Timer", "Install"}
    assert ("Type", "oneshot") in svc["Service"]
    assert dict(svc["Service"])["ExecStart"] == s.systemd_exec(j.unit_argv) + " --unit %i"
    assert dict(svc["Unit"])["OnFailure"] == "pullback-failure@%n.service"
    assert ("Type", "oneshot") in fail["Service"]
    assert ("Wants", "network-online.target") in svc["Unit"] if system else \
        "Wants" not in dict(svc["Unit"])
    hardening = dict(svc["Service"])
    if system:
        assert hardening["ProtectSystem"] == "strict" and hardening["PrivateTmp"] == "yes"
        assert hardening["NoNewPrivileges"] == "yes"
        assert hardening["CapabilityBoundingSet"].split() == [
            "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_MKNOD",
            "CAP_SETFCAP", "CAP_SYS_ADMIN"]  # bwrap's; without a sandboxed host: none
        assert "RestrictSUIDSGID" not in hardening and "PrivateDevices" not in hardening
    else:  # a user manager has no capabilities to bound, nor mounts without user namespaces
        assert "ProtectSystem" not in hardening and hardening["NoNewPrivileges"] == "yes"
    assert dict(tmr["Timer"]) == {"OnCalendar": "*-*-* 02:30:00", "RandomizedDelaySec": "30min",
                                  "Persistent": "true"}
    assert tmr["Install"] == [("WantedBy", "timers.target")]

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the ini check above is the fallback; see the docstring
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    # verify reads files, not the search path: the instances are copies of the templates
    # (the failure handler's instance is the failed unit's name, as OnFailure=...@%n gives).
    instance = service.with_name("pullback-backup@1-3.service")
    handler = failure.with_name("pullback-failure@pullback-backup@1-3.service.service")
    shutil.copy(service, instance)
    shutil.copy(failure, handler)
    argv = [analyze, *([] if system else ["--user"]), "verify", "--man=no",
            str(instance), str(timer), str(handler)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    # systemd-analyze exits 0 on an unknown key and only warns: any output is a failure.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_systemd_analyze_catches_a_broken_unit(tmp_path):
    """Guards the check above: a bad calendar spec must be reported."""
    analyze = shutil.which("systemd-analyze")
    service, timer, _ = write_units(tmp_path,
                                    job(program=str(REPO / ".venv/bin/pullback-backup")),
                                    system=True)
    timer.write_text(timer.read_text().replace("02:30:00", "25:30:00"))
    if analyze is None:
        with pytest.raises(AssertionError):
            assert parse_unit(timer.read_text())["Timer"][0][1].endswith("02:30:00")
        return
    result = subprocess.run([analyze, "verify", "--man=no", str(service), str(timer)],
                            capture_output=True, text=True, check=False)
    assert "calendar" in result.stderr.lower()


# --- gather / plan / apply into a temporary root ----------------------------------------------


def facts(root: Path, **kwargs) -> s.Facts:
    kwargs.setdefault("tools", {})
    kwargs.setdefault("euid", 0)
    kwargs.setdefault("hostname", "backup1")
    kwargs.setdefault("system", "Linux")
    return s.gather(root=root, home=root / "home" / "me", **kwargs)


def test_without_systemd_cron_is_chosen_and_written_atomically_with_mode_0644(tmp_path):
    plan = s.plan_install(facts(tmp_path), job())
    assert plan.kind == "cron" and not plan.problems
    lines = s.apply_schedule(plan)
    path = tmp_path / "etc/cron.d/pullback-backup"
    assert path.read_text() == s.render_cron(job(), system=True, hostname="backup1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert f"{path}: created" in lines
    assert sorted(os.listdir(path.parent)) == ["pullback-backup"]  # no temp file left
    assert any("no cron daemon is running" in line for line in lines)


def test_systemd_not_running_writes_units_and_says_how_to_enable_them(tmp_path):
    plan = s.plan_install(facts(tmp_path), job(), kind="systemd")
    assert plan.after == () and plan.down == "systemd is not running"
    lines = s.apply_schedule(plan)
    units = tmp_path / "etc/systemd/system"
    assert (units / s.TEMPLATE).read_text() == s.render_service(job(), system=True)
    assert (units / s.FAILURE).read_text() == s.render_failure(system=True)
    for host in ("web1", "db1"):  # one instance per --host
        assert (units / f"pullback-backup@{host}.timer").read_text() \
            == s.render_timer(job(), host)
    assert sorted(os.listdir(units)) == [s.TEMPLATE, "pullback-backup@db1.timer",
                                         "pullback-backup@web1.timer", s.FAILURE]
    assert lines[-1].endswith("wrote units; enable them with: systemctl daemon-reload && "
                              "systemctl enable --now pullback-backup@web1.timer "
                              "pullback-backup@db1.timer")


def test_a_second_install_changes_nothing(tmp_path):
    s.apply_schedule(s.plan_install(facts(tmp_path), job(), kind="systemd"))
    mtime = (tmp_path / "etc/systemd/system" / s.TEMPLATE).stat().st_mtime_ns
    plan = s.plan_install(facts(tmp_path), job(), kind="systemd")
    assert not any(step.state is not State.UNCHANGED for step in plan.files)
    lines = s.apply_schedule(plan)
    assert (tmp_path / "etc/systemd/system" / s.TEMPLATE).stat().st_mtime_ns == mtime
    assert any(line.endswith(": unchanged") for line in lines)


def test_dry_run_prints_paths_and_text_and_writes_nothing(tmp_path):
    plan = s.plan_install(facts(tmp_path), job(), kind="systemd")
    text = "\n".join(s.describe(plan, dry_run=True))
    assert f"# {tmp_path}/etc/systemd/system/pullback-backup@.service (would be created)" in text
    assert f"# {tmp_path}/etc/systemd/system/pullback-backup@web1.timer (would be created)" \
        in text
    assert s.systemd_exec(job().unit_argv) + " --unit %i" in text
    assert "would write units" in text
    assert not (tmp_path / "etc").exists()


def write_fake(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_with_systemd_running_units_are_reloaded_and_enabled_once(tmp_path):
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    log = tmp_path / "systemctl.log"
    wants = tmp_path / "etc/systemd/system/timers.target.wants"
    # Like systemctl: enable links each timer into timers.target.wants, disable unlinks it.
    fake = write_fake(tmp_path / "systemctl", f"""
echo "$*" >> {log}
verb=$1; shift; [ "$1" = --now ] && shift
for unit in "$@"; do case "$verb" in
  enable) mkdir -p {wants}; ln -sf ../$unit {wants}/$unit ;;
  disable) rm -f {wants}/$unit ;;
esac; done
""")
    plan = s.plan_install(facts(tmp_path, tools={"systemctl": fake}), job(hosts=(), shard="1/3"))
    assert plan.kind == "systemd"
    s.apply_schedule(plan)
    assert log.read_text().splitlines() == ["daemon-reload",
                                            "enable --now pullback-backup@1-3.timer"]
    log.unlink()
    plan = s.plan_install(facts(tmp_path, tools={"systemctl": fake}), job(hosts=(), shard="1/3"))
    assert plan.after == () and not plan.changed
    s.apply_schedule(plan)
    assert not log.exists()
    # The shard changes (a fourth backup host): the old instance stops and goes.
    plan = s.plan_install(facts(tmp_path, tools={"systemctl": fake}), job(hosts=(), shard="1/4"))
    s.apply_schedule(plan)
    assert log.read_text().splitlines() == ["disable --now pullback-backup@1-3.timer",
                                            "daemon-reload",
                                            "enable --now pullback-backup@1-4.timer"]
    assert os.listdir(wants) == ["pullback-backup@1-4.timer"]
    assert not (tmp_path / "etc/systemd/system/pullback-backup@1-3.timer").exists()


def test_a_failing_systemctl_is_reported(tmp_path):
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    fake = write_fake(tmp_path / "systemctl", 'echo "Failed to connect to bus" >&2; exit 1\n')
    plan = s.plan_install(facts(tmp_path, tools={"systemctl": fake}), job())
    with pytest.raises(s.ApplyError, match="daemon-reload failed .*Failed to connect to bus"):
        s.apply_schedule(plan)


def test_user_units_go_to_the_users_config_and_mention_lingering(tmp_path):
    plan = s.plan_install(facts(tmp_path), job(), kind="systemd", user=True)
    units = tmp_path / "home/me/.config/systemd/user"
    assert {step.path for step in plan.files} == {
        units / s.TEMPLATE, units / s.FAILURE, units / "pullback-backup@web1.timer",
        units / "pullback-backup@db1.timer"}
    assert "systemctl --user daemon-reload" in plan.manual[0]
    assert any("loginctl enable-linger" in note for note in plan.notes)


def test_not_root_means_a_user_schedule(tmp_path):
    plan = s.plan_install(facts(tmp_path, euid=1000), job(), kind="launchd")
    assert plan.user
    assert [step.path for step in plan.files] == [
        tmp_path / "home/me/Library/LaunchAgents/io.pullback.backup.plist"]
    assert plan.manual == (f"launchctl bootstrap gui/1000 "
                           f"{tmp_path}/home/me/Library/LaunchAgents/io.pullback.backup.plist",)


def test_macos_gets_a_launch_daemon_as_root(tmp_path):
    plan = s.plan_install(facts(tmp_path, system="Darwin"), job())
    assert plan.kind == "launchd"
    s.apply_schedule(plan)
    path = tmp_path / "Library/LaunchDaemons/io.pullback.backup.plist"
    data = plistlib.loads(path.read_bytes())
    assert data["ProgramArguments"] == list(job().argv)
    assert data["StandardErrorPath"] == "/Library/Logs/pullback-backup.log"


def test_a_foreign_file_is_never_overwritten_nor_removed(tmp_path):
    path = tmp_path / "etc/cron.d/pullback-backup"
    path.parent.mkdir(parents=True)
    path.write_text("# the admin's own job\n0 1 * * * root /usr/local/bin/mine\n")
    plan = s.plan_install(facts(tmp_path), job())
    assert plan.problems == (f"{path} exists and is not managed by pullback: move it away "
                             "first",)
    with pytest.raises(s.ApplyError):
        s.apply_schedule(plan)
    plan = s.plan_remove(facts(tmp_path))
    assert plan.files == () and plan.notes[0] == f"left alone: {path} is not managed by pullback"
    s.apply_schedule(plan)
    assert path.read_text().startswith("# the admin's own job")


def test_remove_deletes_only_our_files_in_scope(tmp_path):
    s.apply_schedule(s.plan_install(facts(tmp_path), job(), kind="systemd"))
    s.apply_schedule(s.plan_install(facts(tmp_path), job(), kind="systemd", user=True))
    other = tmp_path / "etc/systemd/system/other.service"
    other.write_text("[Service]\nExecStart=/bin/true\n")
    lines = s.apply_schedule(s.plan_remove(facts(tmp_path)))
    assert sorted(os.listdir(tmp_path / "etc/systemd/system")) == ["other.service"]
    assert f"{tmp_path}/etc/systemd/system/pullback-backup@web1.timer: removed" in lines
    # The user's units are another scope: still there.
    assert (tmp_path / "home/me/.config/systemd/user/pullback-backup@web1.timer").exists()
    plan = s.plan_remove(facts(tmp_path))
    assert plan.files == () and plan.notes == ("no pullback schedule found",)


def test_switching_scheduler_removes_our_previous_one(tmp_path):
    s.apply_schedule(s.plan_install(facts(tmp_path), job(), kind="cron"))
    plan = s.plan_install(facts(tmp_path), job(), kind="systemd")
    assert [(step.path.name, step.state) for step in plan.files] == [
        (s.TEMPLATE, State.CREATED), (s.FAILURE, State.CREATED),
        ("pullback-backup@web1.timer", State.CREATED), ("pullback-backup@db1.timer", State.CREATED),
        ("pullback-backup", State.REMOVED)]
    s.apply_schedule(plan)
    assert not (tmp_path / "etc/cron.d/pullback-backup").exists()


def test_stopping_a_running_systemd_timer_before_removing_it(tmp_path):
    s.apply_schedule(s.plan_install(facts(tmp_path), job(), kind="systemd"))
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    plan = s.plan_remove(facts(tmp_path, tools={"systemctl": "/bin/systemctl"}))
    assert plan.before == (("/bin/systemctl", "disable", "--now", "pullback-backup@db1.timer",
                            "pullback-backup@web1.timer"),)
    assert plan.after == (("/bin/systemctl", "daemon-reload"),)


def test_the_single_unit_layout_is_replaced_by_the_template(tmp_path):
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    old = f"# {s.MARKER}: written by `invoke schedule`\n[Service]\nExecStart=/bin/true\n"
    (units / s.SERVICE).write_text(old)
    (units / s.TIMER).write_text(old)
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    plan = s.plan_install(facts(tmp_path, tools={"systemctl": "/bin/systemctl"}),
                          job(hosts=()))
    assert plan.before == (("/bin/systemctl", "disable", "--now", s.TIMER),)
    assert plan.after[-1] == ("/bin/systemctl", "enable", "--now", "pullback-backup@1-1.timer")
    assert {(step.path.name, step.state) for step in plan.files} >= {
        (s.SERVICE, State.REMOVED), (s.TIMER, State.REMOVED),
        ("pullback-backup@1-1.timer", State.CREATED)}


def test_instances_per_shard_and_per_host():
    assert s.plan_instances([], shard=None) == ("1-1",)
    assert s.plan_instances([], shard=(2, 3), own_units=["db1"]) == ("2-3", "db1")
    assert s.plan_instances([], shard=(2, 3), own_units=["db1"], shared=False) == ("db1",)
    assert s.plan_instances(["web1", "db1"], shard=(2, 3)) == ("web1", "db1")
    for named, own in (((), ("1-2",)), (("1-2",), ())):  # --unit 1-2 would be a shard
        with pytest.raises(s.ScheduleError, match="reads as a shard's instance"):
            job(hosts=named, own_units=own)


def test_the_unit_writes_only_below_the_destination_roots():
    j = job(hosts=(), write_paths=("/srv/backups", "/backup/x", "/backup"))
    assert s.unit_write_paths(j) == "-/backup -/media -/mnt -/srv -/var/backups"
    with pytest.raises(s.ScheduleError):
        job(hosts=(), write_paths=("/srv/a b",))
    without = s.render_service(job(hosts=(), bwrap=False), system=True)
    assert "CAP_SYS_ADMIN" not in without and "@swap @mount" in without
    assert "CAP_SYS_ADMIN" in s.render_service(job(hosts=()), system=True)


def fake_crontab(tmp_path: Path, text: str | None) -> str:
    store = tmp_path / "crontab.txt"
    if text is not None:
        store.write_text(text)
    return write_fake(tmp_path / "crontab", f"""
case "$1" in
  -l) [ -e {store} ] || {{ echo "no crontab for me" >&2; exit 1; }}; cat {store} ;;
  -) cat > {store} ;;
esac
""")


def test_the_user_crontab_gets_one_marked_block_and_keeps_every_other_line(tmp_path):
    mine = "MAILTO=me@example.com\n0 4 * * * /usr/bin/true\n# a comment without newline"
    crontab = fake_crontab(tmp_path, mine)
    store = tmp_path / "crontab.txt"
    plan = s.plan_install(facts(tmp_path, user=True, tools={"crontab": crontab}), job(), user=True)
    assert plan.kind == "cron" and plan.files == ()
    s.apply_schedule(plan)
    block = s.render_cron(job(), system=False, hostname="backup1")
    assert store.read_text() == mine + "\n" + block
    # Again, with another time: replaced in place, never duplicated.
    s.apply_schedule(s.plan_install(facts(tmp_path, user=True, tools={"crontab": crontab}),
                                    job(at="04:00"), user=True))
    assert store.read_text().count(s.BEGIN) == 1
    assert store.read_text().startswith(mine + "\n")
    s.apply_schedule(s.plan_remove(facts(tmp_path, user=True, tools={"crontab": crontab}), user=True))
    assert store.read_text() == mine + "\n"


def test_an_empty_user_crontab_and_a_crontab_changed_meanwhile(tmp_path):
    crontab = fake_crontab(tmp_path, None)
    plan = s.plan_install(facts(tmp_path, user=True, tools={"crontab": crontab}), job(), user=True)
    assert plan.crontab == ("", s.render_cron(job(), system=False, hostname="backup1"))
    (tmp_path / "crontab.txt").write_text("0 5 * * * /bin/true\n")  # someone else, meanwhile
    with pytest.raises(s.ApplyError, match="changed since it was read"):
        s.apply_schedule(plan)
    assert (tmp_path / "crontab.txt").read_text() == "0 5 * * * /bin/true\n"


def test_a_user_cron_schedule_needs_crontab(tmp_path):
    plan = s.plan_install(facts(tmp_path), job(), user=True, kind="cron")
    assert any(p.startswith("crontab not found") for p in plan.missing)
    # A dry run still shows the entry (on a new crontab); applying refuses, nothing written.
    assert plan.crontab == ("", s.render_cron(job(), system=False, hostname="backup1"))
    shown = s.describe(plan, dry_run=True)
    assert "# crontab of this user (would be updated)" in shown
    assert shown[-1].startswith("note: a real run stops here: crontab not found")
    with pytest.raises(s.ApplyError, match="crontab not found"):
        s.apply_schedule(plan)


def test_an_unterminated_block_is_left_to_a_person(tmp_path):
    crontab = fake_crontab(tmp_path, f"{s.BEGIN}\n0 1 * * * x\n")
    plan = s.plan_install(facts(tmp_path, user=True, tools={"crontab": crontab}), job(), user=True)
    assert any("without" in p for p in plan.problems)


def test_a_cron_command_too_long_for_cron_is_refused(tmp_path):
    many = [f"host-{i:03d}.example.com" for i in range(60)]
    plan = s.plan_install(facts(tmp_path), job(hosts=many))
    assert any("longer than 900" in p for p in plan.problems)


def test_unknown_kind_is_bad_input(tmp_path):
    with pytest.raises(s.ScheduleError, match="--kind must be one of"):
        s.plan_install(facts(tmp_path), job(), kind="anacron")


# --- the backup key ----------------------------------------------------------------------------


def make_key(path: Path, passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path


def test_check_keys_refuses_a_readable_key_and_warns_about_a_passphrase(tmp_path):
    open_key = make_key(tmp_path / "open")
    open_key.chmod(0o644)
    locked = make_key(tmp_path / "locked", "correct horse")
    report = s.check_keys([str(open_key), str(locked), str(tmp_path / "missing")],
                          agent_socket=None)
    assert report.problems == [
        f"{open_key} has mode 0644: others can read the key that reads every file on your "
        f"servers; fix with: chmod 600 {open_key}",
        f"{tmp_path}/missing does not exist: create it with `invoke keygen`",
    ]
    assert len(report.warnings) == 1 and "--agent-socket" in report.warnings[0]
    assert s.check_keys([str(locked)], agent_socket="/run/agent.sock").warnings == []
