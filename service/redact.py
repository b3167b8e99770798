"""URLs as logs and error messages may show them: a password in the user part, or a secret in
the query (`?password=`, redis-py's form; a presigned URL's signature and credentials, as S3,
GCS and Azure name them) is masked. The service, the click-log tools and the fetcher import it."""
from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_PARAMS = frozenset(("password", "pass", "pwd", "secret", "token", "auth", "signature",
                           "sig", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
                           "x-goog-signature", "x-goog-credential", "awsaccesskeyid"))


def redact_url(url: str) -> str:
    """`url` with the password of its user part and secret query parameters as `***`."""
    u = urlsplit(url)
    netloc = u.netloc
    if u.password is not None:
        netloc = f"{u.username or ''}:***@{u.hostname or ''}" + (f":{u.port}" if u.port else "")
    query = u.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() in SECRET_PARAMS else v) for k, v in pairs],
                              safe="*")
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))
