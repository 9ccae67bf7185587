"""docs/deploy.md as written: every command run, every file checked, read from the guide itself
so that the two cannot drift apart.

The guide's blocks are of four kinds, and a block of any other kind fails this file:

- a file, named by its first line (``# /etc/systemd/system/NAME`` for a unit or a drop-in,
  ``# /etc/polyfan/NAME`` for a TOML config or an environment file);
- ``polyfan keys`` commands, run as written in a scratch directory;
- per-host ``install`` commands (first line ``# on the feed host``), run as written with
  ``/etc/polyfan`` moved into that host's scratch tree;
- the bridge started by hand, run as written with ``--print-config``.

Each unit is checked by ``systemd-analyze verify``, and its role is run the way the unit runs
it: its ``ExecStart`` with the environment its ``Environment=`` and ``EnvironmentFile=`` give,
``%d`` and ``%C`` standing for a credentials directory filled as ``LoadCredential=`` says and a
cache root where ``CacheDirectory=`` is made.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq.auth

import polyfan

GUIDE = Path(__file__).parents[1] / "docs" / "deploy.md"
ETC = "/etc/polyfan"
UNIT_DIR = "/etc/systemd/system/"
INSTALLED = "/opt/polyfan/bin/polyfan"  # the units' ExecStart program
# The venv's own console script stands in for /opt/polyfan/bin/polyfan, which does not exist
# here: systemd-analyze verify refuses a unit whose ExecStart program is missing, and the roles
# are run through it as the units would run them.
POLYFAN = Path(sysconfig.get_path("scripts")) / "polyfan"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
HOST_LINE = re.compile(r"# on (?:the|an) (\w+) host")


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # where it opens in the guide

    @property
    def path(self) -> str | None:
        """The file this block is, from its first line ``# /path``; None for commands."""
        match = re.fullmatch(r"# (/\S+)", self.text.splitlines()[0])
        return match.group(1) if match else None


def guide_blocks() -> list[Block]:
    text = GUIDE.read_text()
    return [
        Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.M | re.S)
    ]


BLOCKS = guide_blocks()
FILES = {b.path: b.text for b in BLOCKS if b.path is not None}
KEYS = [b for b in BLOCKS if b.path is None and b.text.startswith("polyfan keys ")]
INSTALLS = [b for b in BLOCKS if b.path is None and HOST_LINE.match(b.text)]
BY_HAND = [b for b in BLOCKS if b.path is None and b.text.startswith("polyfan bridge ")]


def install_host(block: Block) -> str:
    """The host an install block is for: ``# on the feed host`` is for feed."""
    match = HOST_LINE.match(block.text)
    assert match is not None
    return match.group(1)


@dataclass(frozen=True)
class Unit:
    name: str  # polyfan-proxy.service
    text: str  # the unit, then its drop-ins in the guide's order

    def settings(self, key: str) -> list[str]:
        """Every value of ``key=`` in the unit and its drop-ins, in order."""
        values = []
        for line in self.text.splitlines():
            name, sep, value = line.partition("=")
            if sep and not line.startswith(("#", ";", "[")) and name.strip() == key:
                values.append(value.strip())
        return values

    @property
    def argv(self) -> list[str]:
        (exec_start,) = self.settings("ExecStart")
        return shlex.split(exec_start)

    @property
    def role(self) -> str:
        return self.argv[-1]

    @property
    def config(self) -> str:
        argv = self.argv
        return argv[argv.index("--config") + 1]

    @property
    def host(self) -> str:
        return Path(self.config).stem  # /etc/polyfan/feed.toml: the feed host


def guide_units() -> list[Unit]:
    units = []
    for path, text in FILES.items():
        if path.startswith(UNIT_DIR) and path.endswith(".service"):
            name = path.removeprefix(UNIT_DIR)
            drop_ins = [t for p, t in FILES.items() if p.startswith(f"{UNIT_DIR}{name}.d/")]
            units.append(Unit(name, "\n".join([text, *drop_ins])))
    return units


UNITS = guide_units()


def on_host(root: Path, text: str) -> str:
    """A path (or any text) of the guide's, with /etc/polyfan moved into a host's tree."""
    return text.replace(ETC, f"{root}{ETC}")


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that configures polyfan or numba."""
    drop = ("MASSIVE_API_KEY", "POLYGON_API_KEY", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "TOKEN")
    return {k: v for k, v in os.environ.items() if not k.startswith("POLYFAN_") and k not in drop}


def run_commands(text: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """A block of shell commands, as bash runs them, with the venv's polyfan first on PATH."""
    full_env = clean_environment()
    full_env["PATH"] = f"{POLYFAN.parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.update(env or {})
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", text],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{text}\n{done.stdout}{done.stderr}"
    return done.stdout


def read_environment_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: {line!r} is not KEY=VALUE"
            env[key] = value
    return env


@dataclass(frozen=True)
class Site:
    base: Path  # where the commands ran: keys/ and the certificate files
    keys_output: str
    hosts: dict[str, Path]  # host name: the root its /etc/polyfan is under


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """The guide's commands run as written: the key pairs, then each host's install commands
    (with /etc/polyfan in a tree of the host's own), then its files put where it says."""
    assert POLYFAN.exists(), f"no polyfan console script next to {sys.executable}"
    base = tmp_path_factory.mktemp("deploy")
    (keys,) = KEYS
    keys_output = run_commands(keys.text, cwd=base)
    # §5 installs these; their content is no certificate (nothing here loads them as TLS)
    (base / "edge.crt").write_text("certificate chain\n")
    (base / "edge.key").write_text("private key\n")
    hosts: dict[str, Path] = {}
    for block in INSTALLS:
        host = install_host(block)
        root = hosts.setdefault(host, base / host)
        run_commands(on_host(root, block.text), cwd=base)
    for unit in UNITS:
        root = hosts[unit.host]
        for path in [unit.config, *unit.settings("EnvironmentFile")]:
            target = Path(on_host(root, path))
            target.write_text(on_host(root, FILES[path]))
            target.chmod(0o600 if path.endswith(".env") else 0o644)
    return Site(base, keys_output, hosts)


@dataclass(frozen=True)
class Service:
    """What systemd would hand a unit's process: its argv, its environment, and the
    credentials directory that environment names."""

    argv: list[str]
    env: dict[str, str]
    credentials: Path


def as_systemd_starts(unit: Unit, root: Path, tmp: Path) -> Service:
    """Emulate what systemd does for the unit before it runs ExecStart: copy each credential
    into the credentials directory (``%d``), make each CacheDirectory under the cache root
    (``%C``), read the EnvironmentFile, set each Environment= assignment."""
    credentials = tmp / "credentials" / unit.name
    cache_root = tmp / "cache"
    credentials.mkdir(parents=True)
    specifiers = {"d": str(credentials), "C": str(cache_root), "%": "%"}

    def resolved(value: str) -> str:
        def one(match: re.Match[str]) -> str:
            assert match.group(1) in specifiers, f"{unit.name}: %{match.group(1)} not emulated"
            return specifiers[match.group(1)]

        return on_host(root, re.sub(r"%(.)", one, value))

    for setting in unit.settings("LoadCredential"):
        name, _, source = setting.partition(":")
        copy = credentials / name
        shutil.copyfile(resolved(source), copy)
        copy.chmod(0o400)
    for names in unit.settings("CacheDirectory"):
        for name in names.split():
            (cache_root / name).mkdir(parents=True)
    env: dict[str, str] = {}
    for setting in unit.settings("Environment"):
        for word in shlex.split(setting):
            key, sep, value = word.partition("=")
            assert sep, f"{unit.name}: Environment={setting}"
            env[key] = resolved(value)
    for path in unit.settings("EnvironmentFile"):
        env.update(read_environment_file(Path(on_host(root, path.removeprefix("-")))))
    argv = [on_host(root, arg) for arg in unit.argv]
    assert argv[0] == INSTALLED, argv
    return Service([str(POLYFAN), *argv[1:]], env, credentials)


def run_service(
    service: Service, *extra: str, python: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [*python, *service.argv[1:]] if python else service.argv
    return subprocess.run(
        [*argv, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean_environment(), **service.env},
    )


# The real CLI with the role's ``run`` replaced: the config the role would start with, every
# flag parsed and checked (CURVE flags that go together, the API key, the tokens), as JSON.
CAPTURE = """
import dataclasses, json
import polyfan.{role} as role
from polyfan.cli import main

def capture(config):
    print(json.dumps(dataclasses.asdict(config), default=str))
    return 0

role.run = capture
main(prog_name="polyfan")
"""


def role_config(service: Service, role: str) -> dict[str, Any]:
    done = run_service(service, python=[sys.executable, "-c", CAPTURE.format(role=role)])
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return config


def unit_ids(units: list[Unit]) -> list[str]:
    return [u.name for u in units]


def test_every_block_of_the_guide_is_one_this_file_checks() -> None:
    assert sorted(u.role for u in UNITS) == ["agg", "bridge", "proxy"]
    assert len(KEYS) == 1 and len(BY_HAND) == 1
    assert {install_host(b) for b in INSTALLS} == {u.host for u in UNITS}
    used = {p for u in UNITS for p in [u.config, *u.settings("EnvironmentFile")]}
    units = {f"{UNIT_DIR}{u.name}" for u in UNITS}
    drop_ins = {
        p for p in FILES if any(p.startswith(f"{u}.d/") and p.endswith(".conf") for u in units)
    }
    assert set(FILES) == used | units | drop_ins  # every file is a unit's or one it reads
    languages = {"ini": units | drop_ins, "toml": {u.config for u in UNITS}}
    for block in BLOCKS:
        expected = next((lang for lang, files in languages.items() if block.path in files), "sh")
        assert block.lang == expected, f"docs/deploy.md line {block.line}: ```{block.lang}"
    checked = {id(b) for b in KEYS + INSTALLS + BY_HAND}
    unknown = [b.line for b in BLOCKS if b.path is None and id(b) not in checked]
    assert unknown == [], f"docs/deploy.md lines {unknown}: blocks nothing here runs"


def test_the_key_commands_write_each_pair_with_the_secret_0600(site: Site) -> None:
    for name in ("proxy", "agg", "bridge"):
        public, secret = (
            site.base / "keys" / f"{name}.key",
            site.base / "keys" / f"{name}.key_secret",
        )
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(public.stat().st_mode) == 0o644
        public_key, secret_key = zmq.auth.load_certificate(secret)
        assert secret_key is not None and zmq.auth.load_certificate(public)[0] == public_key
        assert f"public key file: keys/{name}.key" in site.keys_output
        assert f"public key: {public_key.decode()}" in site.keys_output
        assert secret_key.decode() not in site.keys_output


def test_each_host_gets_its_own_secret_alone_and_its_files_readable(site: Site) -> None:
    """What the install commands made: the host's own secret, 0600, and no other; public keys
    and directories readable by the role's user (the TOML and env files are not theirs)."""
    for unit in UNITS:
        root = site.hosts[unit.host]
        etc = root / ETC.lstrip("/")
        assert sorted(root.rglob("*.key_secret")) == [etc / f"{unit.role}.key_secret"]
        written = {Path(on_host(root, p)) for p in [unit.config, *unit.settings("EnvironmentFile")]}
        for path in {etc, *etc.rglob("*")} - written:
            mode = stat.S_IMODE(path.stat().st_mode)
            if path.is_dir():
                assert mode == 0o755, path
            elif path.suffix == ".key_secret" or path.name == "edge.key":
                assert mode == 0o600, path
            else:
                assert mode == 0o644, path
            assert path.stat().st_uid == os.getuid()


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="no systemd-analyze (Debian's systemd)")
@pytest.mark.parametrize("unit", UNITS, ids=unit_ids(UNITS))
def test_systemd_analyze_verify_finds_nothing_to_say_about_the_unit(
    unit: Unit, tmp_path: Path
) -> None:
    assert SYSTEMD_ANALYZE is not None
    path = tmp_path / unit.name
    path.write_text(FILES[f"{UNIT_DIR}{unit.name}"].replace(INSTALLED, str(POLYFAN)))
    for file, text in FILES.items():
        if file.startswith(f"{UNIT_DIR}{unit.name}.d/"):  # verify reads NAME.d/ next to NAME
            drop_in = tmp_path / file.removeprefix(UNIT_DIR)
            drop_in.parent.mkdir(exist_ok=True)
            drop_in.write_text(text)
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    # a clean unit prints nothing; a bad key, value or specifier is a warning line naming the
    # unit's file, and exits 0 all the same
    about_unit = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if unit.name in line or str(tmp_path) in line
    ]
    assert about_unit == [] and done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("unit", UNITS, ids=unit_ids(UNITS))
def test_the_unit_runs_its_role_with_the_config_the_guide_gives(
    unit: Unit, site: Site, tmp_path: Path
) -> None:
    root = site.hosts[unit.host]
    service = as_systemd_starts(unit, root, tmp_path)
    secret = service.credentials / f"{unit.role}.key_secret"
    assert secret.read_bytes() == (root / ETC.lstrip("/") / secret.name).read_bytes()

    done = run_service(service, "--print-config")
    assert done.returncode == 0, done.stderr
    shown = tomllib.loads(done.stdout)[unit.role]
    table = tomllib.loads(on_host(root, FILES[unit.config]))[unit.role]
    assert "curve-secret" not in table  # the unit gives it: the TOML file cannot read it
    for key, value in table.items():
        assert shown[key] == value, key
    assert shown["curve-secret"] == str(secret)
    secrets = [v for k, v in service.env.items() if k in ("MASSIVE_API_KEY", "POLYFAN_TOKENS")]
    for value in secrets:
        for part in value.split(","):
            assert part not in done.stdout

    config = role_config(service, unit.role)
    assert config["curve"]["secret"] == str(secret)
    if unit.role == "proxy":
        assert config["api_key"] == service.env["MASSIVE_API_KEY"] == "your-massive-api-key"
        assert config["pub"] == "tcp://0.0.0.0:8767"
    if unit.role == "agg":
        assert config["sub"] == ["tcp://feed.internal:8767"]
        assert config["pub"] == "tcp://0.0.0.0:8769"
    if unit.role == "bridge":
        assert config["tokens"] == ["token-for-team-a", "token-for-team-b"]
        assert config["listen"] == ["0.0.0.0", 8768]
        # §5's drop-in: the key is the credential copy of the root-only file, the certificate
        # is read where it lies
        assert config["tls_key"] == str(service.credentials / "edge.key")
        assert Path(config["tls_key"]).read_text() == (site.base / "edge.key").read_text()
        assert config["tls_cert"] == on_host(root, f"{ETC}/edge.crt")


def test_each_link_s_keys_pair_up_across_the_hosts(site: Site) -> None:
    """Every --sub of a client reaches a server whose allow directory holds the client's public
    key, and the client's --curve-server for it is the public half of that server's secret."""

    def port(endpoint: str) -> int:
        return int(endpoint.rsplit(":", 1)[1])

    tables = {
        u.role: tomllib.loads(on_host(site.hosts[u.host], FILES[u.config]))[u.role] for u in UNITS
    }
    publics = {}
    for unit in UNITS:
        (load,) = [s for s in unit.settings("LoadCredential") if s.startswith(f"{unit.role}.")]
        source = on_host(site.hosts[unit.host], load.partition(":")[2])
        publics[unit.role] = zmq.auth.load_certificate(source)[0]
    servers = {port(t["pub"]): role for role, t in tables.items() if "pub" in t}
    links = 0
    for client, table in tables.items():
        for index, endpoint in enumerate(table.get("sub", [])):
            server = servers[port(endpoint)]
            allowed = {
                zmq.auth.load_certificate(p)[0]
                for p in Path(tables[server]["curve-allow"]).glob("*.key")
            }
            assert allowed == {publics[client]}, (client, server)
            files = table["curve-server"]
            server_key = files[0] if len(files) == 1 else files[index]
            assert zmq.auth.load_certificate(server_key)[0] == publics[server], (client, server)
            links += 1
    assert links == 3  # agg to proxy, bridge to each of two aggs


def test_the_bridge_by_hand_with_tls(site: Site) -> None:
    (block,) = BY_HAND
    (edge,) = [site.hosts[u.host] for u in UNITS if u.role == "bridge"]
    text = on_host(edge, block.text).rstrip() + " --print-config"
    printed = run_commands(text, cwd=site.base, env={"TOKEN": "hand-token-123"})
    shown = tomllib.loads(printed)["bridge"]
    assert shown["sub"] == ["tcp://agg-host:8769"] and shown["listen"] == "0.0.0.0:443"
    assert shown["token"] == ["****"] and "hand-token-123" not in printed
    assert shown["tls-cert"] == on_host(edge, f"{ETC}/edge.crt")
    assert shown["tls-key"] == on_host(edge, f"{ETC}/edge.key")


def can_unshare_mounts() -> bool:
    try:
        done = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10)
    except OSError:
        return False
    return done.returncode == 0


@pytest.mark.skipif(
    not can_unshare_mounts(),
    reason="needs a mount namespace (root, unshare -m) for a read-only install",
)
@pytest.mark.parametrize("unit", UNITS, ids=unit_ids(UNITS))
def test_a_read_only_install_imports_the_role_with_the_unit_s_numba_cache(
    unit: Unit, site: Site, tmp_path: Path
) -> None:
    """Under ProtectSystem=strict the installed source is read-only and so is a dynamic user's
    home (``/``): numba's two places for its cache. Here polyfan's package directory is made
    read-only in a mount namespace of the import's own and is HOME too. A role whose kernels
    numba caches cannot even be imported then, unless NUMBA_CACHE_DIR points somewhere
    writable: the unit's CacheDirectory."""
    package = Path(polyfan.__file__).resolve().parent
    script = (
        f"mount --bind {package} {package} && mount -o remount,bind,ro {package} && "
        f'exec {shlex.quote(sys.executable)} -c "import polyfan.{unit.role}"'
    )

    def imports(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        env = {**clean_environment(), "HOME": str(package), **extra}
        return subprocess.run(
            ["unshare", "-m", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )

    service = as_systemd_starts(unit, site.hosts[unit.host], tmp_path)
    cache = service.env.get("NUMBA_CACHE_DIR")
    without = imports({})
    if cache is None:
        assert without.returncode == 0, without.stderr  # the role caches no kernel
        return
    assert without.returncode != 0 and "no locator available" in without.stderr
    assert [cache] == [str(tmp_path / "cache" / n) for n in unit.settings("CacheDirectory")]
    with_cache = imports({"NUMBA_CACHE_DIR": cache})
    assert with_cache.returncode == 0, with_cache.stderr
