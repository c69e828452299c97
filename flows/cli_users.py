"""``corelab`` commands for portal accounts and the portal itself (added to flows/cli.py's parser).

    corelab user add NAME --role site|physicist|trial-manager|admin [--site S ...] [--trial T ...]
                          [--full-name "..."] [--oidc SUBJECT] [--password-stdin]
    corelab user change NAME [--role R] [--site S ...] [--trial T ...] [--full-name ...] [--enable]
    corelab user disable NAME
    corelab user reset NAME [--password-stdin]          new password; unlocks the account
    corelab user list [--json]
    corelab user token NAME [--label L] [--days N]      a new API token, printed once
    corelab user tokens NAME / corelab user revoke TOKEN_ID
    corelab portal [--host H] [--port P]                the web portal
"""

from __future__ import annotations

import getpass
import sys

from flows.cli_common import cli_actor, print_result, session, settings


def _read_password(args, name: str) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"password for {name}: ")
    if getpass.getpass("again: ") != first:
        from corelab.accounts import AccountError

        raise AccountError("the two passwords differ")
    return first


def cmd_user_add(args) -> int:
    from services import accounts

    password = None if (args.oidc and not args.password_stdin) else _read_password(args, args.name)
    with session() as s:
        data = accounts.add_user(s, args.name, role=args.role, sites=args.site, trials=args.trial,
                                 full_name=args.full_name or "", password=password, oidc_subject=args.oidc,
                                 actor=cli_actor())
    print_result(args, data)
    return 0


def cmd_user_change(args) -> int:
    from services import accounts

    with session() as s:
        data = accounts.change_user(s, args.name, actor=cli_actor(), role=args.role, sites=args.site,
                                    trials=args.trial, full_name=args.full_name, enable=args.enable)
    print_result(args, data)
    return 0


def cmd_user_disable(args) -> int:
    from services import accounts

    with session() as s:
        print_result(args, accounts.disable_user(s, args.name, actor=cli_actor()))
    return 0


def cmd_user_reset(args) -> int:
    from services import accounts

    password = _read_password(args, args.name)
    with session() as s:
        print_result(args, accounts.reset_password(s, args.name, password, actor=cli_actor()))
    return 0


def cmd_user_list(args) -> int:
    from services import accounts

    with session() as s:
        rows = accounts.user_rows(s)
    print_result(args, rows, rows, ["name", "full_name", "role", "sites", "trials", "password", "oidc", "disabled",
                                    "locked", "last_login_at"])
    return 0


def cmd_user_token(args) -> int:
    from services import accounts

    with session() as s:
        data = accounts.create_token(s, args.name, actor=cli_actor(), label=args.label or "", days=args.days or None)
    print_result(args, data)
    if not args.json:
        print("(the token is shown only now: store it in the client's secret store)", file=sys.stderr)
    return 0


def cmd_user_tokens(args) -> int:
    from services import accounts

    with session() as s:
        rows = accounts.token_rows(s, args.name)
    print_result(args, rows, rows, ["id", "label", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at"])
    return 0


def cmd_user_revoke(args) -> int:
    from services import accounts

    with session() as s:
        print_result(args, accounts.revoke_token(s, args.token_id, actor=cli_actor()))
    return 0


def cmd_portal(args) -> int:
    import dataclasses

    from portal.serve import run_portal

    config = settings()
    config = dataclasses.replace(config, portal_host=args.host or config.portal_host,
                                 portal_port=args.port or config.portal_port)
    run_portal(config)
    return 0


def user_errors() -> tuple[type[Exception], ...]:
    from corelab.accounts import AccountError

    return (AccountError,)


def add_commands(sub, common) -> None:
    """Add ``user`` and ``portal`` to the ``corelab`` parser."""
    p = sub.add_parser("user", help="portal accounts: add, change, disable, reset, API tokens")
    s = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = s.add_parser("add", parents=[common], help="create an account (asks for its password)")
    q.add_argument("name")
    q.add_argument("--role", required=True, choices=["site", "physicist", "trial-manager", "admin"])
    q.add_argument("--site", action="append", help="site code of a site user (repeatable)")
    q.add_argument("--trial", action="append", help="trial code of a trial manager (repeatable)")
    q.add_argument("--full-name", help="printed name, shown with an e-signature")
    q.add_argument("--oidc", metavar="SUBJECT", help="bind the OpenID Connect subject ('sub') this user logs in as")
    q.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    q.set_defaults(func=cmd_user_add)
    q = s.add_parser("change", parents=[common], help="change role, scope or printed name; --enable a disabled one")
    q.add_argument("name")
    q.add_argument("--role", choices=["site", "physicist", "trial-manager", "admin"])
    q.add_argument("--site", action="append")
    q.add_argument("--trial", action="append")
    q.add_argument("--full-name")
    q.add_argument("--enable", action="store_true")
    q.set_defaults(func=cmd_user_change)
    q = s.add_parser("disable", parents=[common], help="disable an account (its sessions end, its tokens stop)")
    q.add_argument("name")
    q.set_defaults(func=cmd_user_disable)
    q = s.add_parser("reset", parents=[common], help="set a new password (unlocks a locked account)")
    q.add_argument("name")
    q.add_argument("--password-stdin", action="store_true")
    q.set_defaults(func=cmd_user_reset)
    q = s.add_parser("list", parents=[common], help="every account with its role and scope")
    q.set_defaults(func=cmd_user_list)
    q = s.add_parser("token", parents=[common], help="a new API token for a machine client (printed once)")
    q.add_argument("name")
    q.add_argument("--label", help="what the token is for")
    q.add_argument("--days", type=int, default=365, help="valid for this many days (0: no expiry; default 365)")
    q.set_defaults(func=cmd_user_token)
    q = s.add_parser("tokens", parents=[common], help="a user's API tokens (never the tokens themselves)")
    q.add_argument("name")
    q.set_defaults(func=cmd_user_tokens)
    q = s.add_parser("revoke", parents=[common], help="revoke an API token")
    q.add_argument("token_id", type=int)
    q.set_defaults(func=cmd_user_revoke)

    p = sub.add_parser("portal", help="run the web portal (see README: first admin, TLS)")
    p.add_argument("--host", help="listen address (default: the portal_host setting, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: the portal_port setting, 8080)")
    p.set_defaults(func=cmd_portal)
