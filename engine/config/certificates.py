"""Checks of the certificate files the configuration names (``teacher.ca_bundle``).

Here rather than in ``engine.teacher.network``, which applies them: the configuration checks
its own values when it loads, and imports nothing from the teacher.
"""

from __future__ import annotations

import ssl


def ca_bundle_problem(path: str) -> str | None:
    """Why ``path`` is not a usable PEM bundle of CA certificates (missing, a directory, no
    ``-----BEGIN CERTIFICATE-----`` block, unreadable), in words; None when it is usable.
    Never raises for what the file is."""
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except FileNotFoundError:
        return f"no such file: {path}"
    except IsADirectoryError:
        return f"{path} is a directory; give the PEM file of the CA certificates"
    except ssl.SSLError:  # an OSError too: first
        return (
            f"{path} holds no PEM certificate (a CA bundle is one or more "
            "'-----BEGIN CERTIFICATE-----' blocks)"
        )
    except OSError as err:
        return f"cannot read {path}: {err.strerror or err}"
    return None
