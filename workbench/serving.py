"""The server settings the app insists on: localhost only, the upload cap, no usage statistics.

`streamlit run workbench/app.py` reads `workbench/.streamlit/config.toml`
(beside the entry point) from any working directory, and it overrides the
user's and the working directory's config files. `unsafe_server_settings`
catches the case where that file was lost; a command-line flag such as
`--server.address 0.0.0.0` (or a STREAMLIT_* environment variable) is the
user's explicit choice and is respected.
"""
from __future__ import annotations

SAFE_SETTINGS = {  # option -> is this value safe
    "server.address": lambda v: v in ("localhost", "127.0.0.1", "::1") or str(v).startswith("unix://"),
    "browser.gatherUsageStats": lambda v: v is False,
    "server.maxUploadSize": lambda v: isinstance(v, (int, float)) and 0 < v <= 2,
}
EXPLICIT = ("command-line argument or environment variable", "environment variable")  # config.get_where_defined


def unsafe_server_settings() -> list[str]:
    """'option = value (from where)' for each setting that exposes the app without being asked for."""
    from streamlit import config

    if config.get_option("global.appTest"):  # AppTest runs the script without a server
        return []
    problems = []
    for key, safe in SAFE_SETTINGS.items():
        value, where = config.get_option(key), config.get_where_defined(key)
        if not safe(value) and where not in EXPLICIT:
            problems.append(f"{key} = {value!r} (from {where})")
    return problems


__all__ = ["unsafe_server_settings", "SAFE_SETTINGS"]
