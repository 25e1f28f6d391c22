"""`imgfarm token create|list|revoke`: the operators' API tokens.

A token is printed once, when it is created (or written to a new 0600 file
with --file); the database holds only its hash, so a lost token is revoked and
made again, never shown again.
"""

from __future__ import annotations

from pathlib import Path

import typer

from imgfarm.cli.credentials import write_token_file
from imgfarm.cli.jobs import who
from imgfarm.cli.output import echo, handles_errors, json_option, print_json, table
from imgfarm.errors import InvalidInput

app = typer.Typer(help="Operator tokens for the HTTP API: scopes read, operate, admin.",
                  no_args_is_help=True)


@app.command("create")
@handles_errors
def create(
    name: str = typer.Argument(..., help="who or what uses it, e.g. alice or prometheus"),
    scope: str = typer.Option(..., "--scope", help="read (jobs, nodes, images) | operate "
                              "(capture, restore, convert, cancel, windows) | admin (nodes, "
                              "drivers, tokens); each includes the ones before it"),
    file: Path | None = typer.Option(None, "--file", help="write the token to this new file "
                                     "(mode 0600) instead of printing it"),
    json_out: bool = json_option(),
) -> None:
    """Make a token and show it once."""
    # lazy: SQLAlchemy loads only for the commands that use the database
    from imgfarm.models.db import session_scope
    from imgfarm.models.tokens import check_scope, create_token

    check_scope(scope)
    if file is not None and file.exists():
        raise InvalidInput(f"--file {file} exists", hint="name a new file; a token is never overwritten")
    creator = who(check_token=False)
    with session_scope() as s:
        token = create_token(s, name, scope, created_by=creator)
        if file is not None:
            write_token_file(file, token)  # inside the transaction: no file, no token
    if json_out:
        print_json({"name": name, "scope": scope, **({"file": str(file)} if file else {"token": token})})
    elif file is not None:
        echo(f"token {name} ({scope}) written to {file}")
    else:
        typer.echo(token)
        echo(f"token {name} ({scope}): shown only now; give it to its user as IMGFARM_TOKEN or a "
             "0600 file (IMGFARM_TOKEN_FILE)", err=True)


@app.command("list")
@handles_errors
def list_tokens(json_out: bool = json_option()) -> None:
    """Every token's name, scope, creator and last use (never the secret)."""
    # lazy: SQLAlchemy, only for this command
    from imgfarm.models.db import session_scope
    from imgfarm.models.tokens import token_views

    with session_scope() as s:
        rows = token_views(s)
    if json_out:
        print_json(rows)
        return
    table(["name", "scope", "created", "by", "last used"],
          [[r["name"], r["scope"], r["created_at"][:19], r["created_by"], (r["last_used_at"] or "-")[:19]]
           for r in rows])


@app.command("revoke")
@handles_errors
def revoke(name: str = typer.Argument(..., help="the token's name (see `imgfarm token list`)")) -> None:
    """Remove a token: the API refuses it from the next request on."""
    # lazy: SQLAlchemy, only for this command
    from imgfarm.models.db import session_scope
    from imgfarm.models.tokens import revoke_token

    with session_scope() as s:
        revoke_token(s, name)
    echo(f"revoked token {name}")
