"""Credentials written into a job file: found by what they are (detect-secrets' plugins: keywords,
AWS and Azure keys, basic-auth URIs, JWTs, private keys, vendor tokens) and where they sit (the
user part of a URI, a signed URL's signature, a credential-named variable), in every string of the
job. `find_credentials(data)` returns one problem per place, with its dotted path and how to pass
the credential by reference instead; it never repeats the value.

detect-secrets is imported on first use, so that `launcher --help` stays fast.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlsplit

# The entropy detectors flag ids and hashes (subject ids, commit shas) that jobs legitimately
# hold; public IP addresses are endpoints, not secrets.
SKIPPED_PLUGINS = {"Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector"}
# Backs detect-secrets' keyword detector, which misses names that only hold credentials
# (AZURE_STORAGE_KEY, ..._CONNECTION_STRING) and short values (HF_TOKEN=x): a variable with one
# of these as a word of its name holds a credential whatever its value.
CREDENTIAL_WORD_RE = re.compile(r"(^|_)(KEY|SAS|CONNECTION_STRING|PASS|PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIALS?)(_|$)", re.I)
# Query parameters that make a URL a signed one (S3 presigned, GCS signed, Azure SAS).
SIGNATURE_PARAMS = {"x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
                    "x-goog-credential", "sig", "signature"}
ASSIGNMENT_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=([^,\s]*)")

BY_REFERENCE = ("pass it by reference instead: on Kubernetes a Secret named in cluster.kubernetes.credentials_secret "
                "(its keys become the workers' environment through envFrom), on Slurm and local runs the "
                "environment of the submitting shell (exported to the workers), or the storage's own "
                "credential chain (profiles, workload identity; see docs/storage.md)")


@lru_cache(maxsize=1)
def _plugins() -> tuple[tuple, re.Pattern, re.Pattern]:
    """detect-secrets' plugins, and two tests that a string passes before any of them can flag it:
    one of the keyword detector's keywords; one of the other detectors' own patterns."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.plugins import keyword

    plugins = tuple(cls() for cls in get_mapping_from_secret_type_to_class().values()
                    if cls.__name__ not in SKIPPED_PLUGINS)
    patterns = [p for plugin in plugins for p in getattr(plugin, "denylist", ())]
    return plugins, re.compile("|".join(keyword.DENYLIST), re.IGNORECASE), re.compile("|".join(map(_scoped, patterns)))


def _scoped(pattern: re.Pattern) -> str:
    """`pattern` as a group that keeps its own flags inside an alternation of patterns."""
    letters = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"), (re.VERBOSE, "x"))
    on = "".join(c for flag, c in letters if pattern.flags & flag)
    off = "".join(c for flag, c in letters if not pattern.flags & flag)
    return f"(?{on}-{off}:{pattern.pattern})" if off else f"(?{on}:{pattern.pattern})"


def _detected(text: str) -> str | None:
    """The kind of secret detect-secrets sees in `text`, if any. The prefilters save a call of each
    of 24 plugins on the strings where none can match (20,000 inline subjects took 3 s without)."""
    plugins, has_keyword, has_pattern = _plugins()
    keyword_possible, pattern_possible = bool(has_keyword.search(text)), bool(has_pattern.search(text))
    if not (keyword_possible or pattern_possible):
        return None
    for plugin in plugins:
        if not (keyword_possible if not hasattr(plugin, "denylist") else pattern_possible):
            continue
        if any(True for _ in plugin.analyze_line(filename="job.yaml", line=text, line_number=1)):
            return getattr(plugin, "secret_type", type(plugin).__name__)
    return None


def _named(name: str, value: str) -> str | None:
    """What makes `name=value` a credential: detect-secrets' keywords, or a credential word."""
    if not value:
        return None
    if CREDENTIAL_WORD_RE.search(name):
        return f"{name} names a credential"
    return _detected(f"{name}={value}")


def _in_uri(text: str) -> str | None:
    if "://" not in text:
        return None
    try:
        parts = urlsplit(text.strip())
    except ValueError:
        return None
    if "@" in parts.netloc:
        return "the URI carries a user or token before '@'"
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name.lower() in SIGNATURE_PARAMS:
            return f"the URI is a signed URL (query parameter {name})"
        if found := _named(name, value):
            return f"the URI's query parameter {name}: {found}"
    return None


def credential_in(text: str, name: str | None = None) -> str | None:
    """Why `text` (the value of variable `name`, if it is one) is a credential, or None."""
    if name is not None and (found := _named(name, text)):
        return found
    if found := _in_uri(text):
        return found
    for var, value in ASSIGNMENT_RE.findall(text):  # --export=ALL,AWS_SECRET_ACCESS_KEY=...
        if found := _named(var, value):
            return found
    return _detected(text)


def _strings(data: Any, path: str) -> Iterator[tuple[str, str | None, str]]:
    """(dotted path, the mapping key when free-form, string) for every string under `data`."""
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str):
                yield from _strings(value, f"{path}.{key}" if path else key)
                if isinstance(value, str) and path == "cluster.env":
                    yield f"{path}.{key}", key, value
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _strings(value, f"{path}.{i}")
    elif isinstance(data, str):
        yield path, None, data


JOB_FILE = ("a job file is copied into rendered scripts, manifests and the output's job.yaml, so it never "
            "holds one")
MANIFEST_ROW = "a subjects manifest's rows reach the workers' logs and status records, so they never hold one"


def find_credentials(data: Any, why: str = JOB_FILE) -> list[str]:
    """One problem per string of the job (a raw dict), or of a manifest row, that holds a credential."""
    problems, seen = [], set()
    for path, name, text in _strings(data, ""):
        if path in seen:
            continue
        if found := credential_in(text, name):
            seen.add(path)
            problems.append(f"{path}: holds a credential ({found}); {why}: {BY_REFERENCE}")
    return problems
