# -*- test-case-name: tests.test_tap,tests.test_settings,tests.test_check,tests.test_jsonlog -*-
"""
The twistd plugin: its options, built from the table of L{rrlb.settings},
and L{makeService}, the only place that picks the real reactor and the
process's environment and hands them to the service tree that L{compose}
puts together: the control side (L{rrlb.service}) with a traffic side
(L{rrlb.traffic}), or with the supervisor of worker processes
(L{rrlb.workers}).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from rrlb import __version__
from rrlb.accesslog import STDOUT
from rrlb.clients import raise_fd_limit
from rrlb.config import (
    Config,
    ConfigError,
    build_config,
    parser,
    with_admin_token,
)
from rrlb.configdump import document, summary
from rrlb.failures import LocalErrors
from rrlb.jsonlog import use_json_log
from rrlb.notify import recover_listen_fds
from rrlb.pool import Pools
from rrlb.service import ControlService
from rrlb.settings import Setting, command_line
from rrlb.tls import check_tls, listen_endpoint, listen_kind, tls_on_tcp
from rrlb.values import Parser

log = Logger()

# Every setting with an option: its path in Config, its row, its option.
_OPTIONS = tuple((path, row, str(row.flag)) for path, row in command_line())
# What usage.Options puts before the error of a coerce function.
_COERCE_FAILED = "Parameter type enforcement failed: "
# The listener kinds whose sockets worker processes can share.
SHARED_KINDS = ("tcp", "tcp6", "ssl", "unix", "systemd")


def _coerce(row: Setting, option: str) -> Callable[[str], Any]:
    parse = parser(row)
    # usage.Options turns the ConfigError (a ValueError) into a UsageError.
    return lambda value: parse(f"--{option}", value)


def _repeated(each: Parser, option: str, doc: str) -> Callable[[Options, str], None]:
    def opt(self: Options, value: str) -> None:
        try:
            self[option].append(each(f"--{option}", value))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    opt.__doc__ = doc
    return opt


class Options(usage.Options):
    """
    C{twistd rrlb} options, one per setting with an option in the table of
    L{rrlb.settings}. Each default is L{None} (or empty) here so that a
    value given can be told from one not given, and win over the YAML file.
    """

    synopsis = "[options]"
    longdesc = (
        "rrlb balances HTTP requests over backend nodes in round-robin order, "
        "taking nodes out of rotation when their health checks fail."
    )
    optFlags = [
        [
            "check",
            None,
            "Check the configuration (files, flags, TLS files) and exit: 0 with one line"
            " 'configuration ok: ...', or 1 with the error. Binds no port.",
        ],
        [
            "print-config",
            None,
            "Print the effective configuration as YAML (defaults filled in, secrets left"
            " out) and exit.",
        ],
    ] + [[o, None, r.help_text()] for _, r, o in _OPTIONS if r.default is False]
    optParameters: list[list[Any]] = [
        ["config", "c", None, "YAML configuration file; command-line flags override it."]
    ] + [
        [o, None, None, r.help_text(), _coerce(r, o)]
        for _, r, o in _OPTIONS
        if r.default is not False and r.each is None
    ]

    def __init__(self) -> None:
        super().__init__()
        for _, row, option in _OPTIONS:
            if row.each is not None:
                self[option] = []

    def opt_version(self) -> None:
        """
        Print rrlb's version and exit.
        """
        print(f"rrlb {__version__}")
        raise SystemExit(0)

    def given(self) -> dict[str, Any]:
        """
        The settings given on the command line, as L{build_config} takes
        them: a section's as a mapping.
        """
        values: dict[str, Any] = {}
        for path, row, option in _OPTIONS:
            value = self[option]
            if row.default is False:
                # An on/off flag: usage.Options gives 0 unless it is given.
                value = True if value else None
            if value is not None and value != []:
                *section, name = path
                place = values.setdefault(section[0], {}) if section else values
                place[name] = tuple(value) if isinstance(value, list) else value
        return values

    def load(self, document: Optional[Mapping[str, Any]] = None) -> Config:
        """
        Build the configuration from the YAML file (read again on every
        call, so a reload calls this) and the command line.

        @param document: the file's settings, read already (C{PUT
            /config}): applied as if the C{--config} file held them.
        @raise ConfigError: for any bad setting.
        """
        config = build_config(
            self["config"], self.given(), require_nodes=not self["demo"], document=document
        )
        # Certificate, key and CA files are read now, so a bad one is refused
        # at start-up and on reload before anything changes.
        check_tls(config)
        name = "--admin-token-file" if self["admin-token-file"] else "admin_token_file"
        return with_admin_token(config, name)

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        argv = sys.argv[1:] if options is None else list(options)
        checking = "--check" in argv or "--print-config" in argv
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if not checking:
                raise
            # The one line alone, without twistd's usage text (nor the
            # prefix usage.Options gives a coerce function's error).
            print(str(e).removeprefix(_COERCE_FAILED), file=sys.stderr)
            raise SystemExit(1) from None

    def postOptions(self) -> None:
        checking = bool(self["check"] or self["print-config"])
        self.validate(checking)
        if checking:
            self.report()
        if self.config.log_format == "json":
            use_json_log(getattr(self, "parent", None))

    def report(self) -> None:
        """
        C{--check}: say the configuration is fine; C{--print-config}: print
        it. Then exit 0, before anything listens or starts.
        """
        config = self.config
        if self["print-config"]:
            import yaml

            print(f"# rrlb {__version__}: the effective configuration (secrets left out)")
            print(yaml.safe_dump(document(config), sort_keys=False), end="")
        else:
            print(f"configuration ok: {summary(config)}")
        raise SystemExit(0)

    def validate(self, checking: bool = False) -> None:
        """
        Read and check everything a start would, without listening.

        @param checking: for C{--check}: systemd's sockets are not looked
            for (ExecReload runs without them).
        """
        try:
            self.config = config = self.load()
            descriptions = config.listen + ((config.admin,) if config.admin else ())
            if any(listen_kind(d.lstrip())[1] == "systemd" for d in descriptions) and not checking:
                recover_listen_fds(os.getpid())
            on_tcp = tls_on_tcp(config.listen, config.tls)
            for description in config.listen:
                if not (checking and listen_kind(description.lstrip())[1] == "systemd"):
                    check_endpoint(description, tls=(config.tls, on_tcp))
            if config.admin and not (checking and listen_kind(config.admin)[1] == "systemd"):
                check_endpoint(config.admin, "--admin")
            if config.http2:
                check_http2("--http2" if self["http2"] else "http2")
            if config.workers > 1:
                check_listeners(config)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if config.access_log not in (None, STDOUT):
            name = "--access-log" if self["access-log"] else "access_log"
            check_log_path(config.access_log, name)


for _, _row, _option in _OPTIONS:
    if _row.each is not None:
        _opt = _repeated(_row.each, _option, _row.help_text())
        setattr(Options, "opt_" + _option.replace("-", "_"), _opt)


def check_listeners(config: Config) -> None:
    """
    Refuse listeners whose sockets workers cannot share.

    @raise ConfigError: naming the listener.
    """
    on_tcp = tls_on_tcp(config.listen, config.tls)
    for description in config.listen:
        kind = listen_kind(description)[1]
        if kind not in SHARED_KINDS:
            raise ConfigError(
                f"--workers: the listener {description!r} cannot be shared with worker"
                f" processes (only {', '.join(SHARED_KINDS)} listeners can)"
            )
        if kind == "ssl" or (kind == "tcp" and on_tcp):
            if listen_endpoint(None, description, config.tls, on_tcp)[1] is None:
                raise ConfigError(
                    f"--workers: the listener {description!r} has TLS settings rrlb does"
                    " not serve itself, so worker processes cannot take it over"
                )


def check_endpoint(
    description: str, name: str = "--listen", tls: Optional[tuple[Any, bool]] = None
) -> None:
    """
    Parse an endpoint description now, so a bad one stops start-up with a
    clear line rather than a traceback later. No reactor is needed (nor
    imported) for that: the one that will listen is picked in makeService.

    @param tls: for a listener, the L{ListenTLS} settings and whether tcp:
        listeners serve TLS (see L{rrlb.tls.listen_endpoint}).
    """
    try:
        if tls is None:
            serverFromString(None, description)
        else:
            listen_endpoint(None, description, *tls)
    except ConfigError:
        raise
    except (IndexError, KeyError) as e:
        if listen_kind(description)[1] == "systemd":
            # twisted.python.systemd found no such inherited socket.
            raise usage.UsageError(
                f"{name}: no socket from systemd for {description!r}"
                " (LISTEN_FDS/LISTEN_PID do not pass one to this process; see rrlb.socket)"
            ) from None
        raise usage.UsageError(f"{name}: bad endpoint description {description!r}: {e}") from None
    except Exception as e:
        raise usage.UsageError(f"{name}: bad endpoint description {description!r}: {e}") from None


def check_http2(name: str) -> None:
    """
    Load rrlb's HTTP/2 support now, so that a missing C{h2} package (a
    dependency, so only in a broken install) stops start-up with one line
    rather than a traceback when the service is built.
    """
    try:
        import rrlb.http2  # noqa: F401
    except ImportError as e:
        raise usage.UsageError(
            f"{name}: HTTP/2 support cannot be loaded ({e});"
            " reinstall rrlb, or pip install 'twisted[http2]'"
        ) from None


def check_log_path(path: str, name: str) -> None:
    """
    Open the access log file once now, so one that cannot be written stops
    start-up with a clear line.
    """
    try:
        open(path, "ab").close()
    except OSError as e:
        raise usage.UsageError(f"{name}: cannot open {path!r}: {e.strerror or e}") from None


def warn_open_proxy_protocol(config: Config) -> None:
    """
    Say once at start-up that C{haproxy:} listeners believe any peer's
    PROXY header when C{proxy_protocol_from} is unset.
    """
    if config.proxy_protocol_from:
        return
    proxied = [d for d in config.listen if listen_kind(d)[0]]
    if proxied:
        log.warn(
            "{listeners}: any peer that reaches a haproxy: listener can claim any client"
            " address in its PROXY header; set proxy_protocol_from"
            " (--proxy-protocol-from) to the load balancers' addresses",
            listeners=", ".join(proxied),
        )


def compose(
    config: Config,
    reactor: Any,
    load_config: Optional[Callable[[], Config]] = None,
    environ: Optional[Mapping[str, str]] = None,
    pid: int = 0,
    handle_signals: bool = False,
) -> ControlService:
    """
    rrlb's service tree for C{config}: the control side around a traffic
    side. In one process that is a L{Traffic}; with C{--workers} above 1,
    the supervisor of the worker processes (L{rrlb.workers}, imported only
    then), each of which builds its own L{Traffic}. Both sides share the
    pools.

    @param load_config: reads the configuration again, for a reload.
    @param environ: the process environment, for systemd's notifications.
    @param pid: this process's id, for systemd's watchdog.
    @param handle_signals: reload on C{SIGHUP} (the real process only).
    """
    pools = Pools()
    if config.workers > 1:
        from rrlb.workers.main import WorkersTraffic
        from rrlb.workers.totals import MainAdminSite, WorkersHistory

        return ControlService(
            config,
            reactor,
            pools,
            WorkersTraffic(config, reactor, pools),
            load_config,
            environ,
            pid,
            handle_signals,
            admin_site=MainAdminSite,
            history=WorkersHistory,
        )
    # Only now: the proxy imports twisted.web.proxy, which imports the global
    # reactor, and parsing the options must not.
    from rrlb.traffic import Traffic

    # One process: the probes and the requests share one account of rrlb's
    # own resource errors.
    local_errors = LocalErrors(reactor)
    return ControlService(
        config,
        reactor,
        pools,
        Traffic(config, reactor, pools, local_errors=local_errors),
        load_config,
        environ,
        pid,
        handle_signals,
        local_errors=local_errors,
    )


def makeService(options: Options) -> ControlService:
    """
    Build rrlb's service tree from parsed options, with the real reactor
    and this process's environment.
    """
    from twisted.internet import reactor

    raise_fd_limit(options.config.max_connections)
    warn_open_proxy_protocol(options.config)
    return compose(
        options.config,
        reactor,
        options.load,
        environ=os.environ,
        pid=os.getpid(),
        handle_signals=True,
    )
