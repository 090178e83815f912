"""The protocol double's own safety net: what it does not understand is refused with a 4xx and recorded, so a change
of the client's protocol cannot pass silently; what the Hub would answer with an error, it answers the same way."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from hub_double import HubDouble


def call(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


@pytest.fixture
def double(tmp_path):
    with HubDouble(tmp_path, "hf_good") as hub:
        yield hub


AUTH = {"Authorization": "Bearer hf_good", "Content-Type": "application/json"}


def test_unknown_requests_are_refused_and_recorded(double):
    create = json.dumps({"name": "m", "organization": None, "colour": "red"}).encode()
    assert call(f"{double.url}/api/repos/create", "POST", create, AUTH)[0] == 400  # unknown JSON key
    assert call(f"{double.url}/api/spaces/tester/m")[0] == 400  # unknown endpoint
    assert call(f"{double.url}/api/models/tester/m/tree/main?sort=desc")[0] == 400  # unknown query parameter
    assert len(double.rejected) == 3 and "colour" in double.rejected[0]
    double.rejected.clear()


def test_hub_errors_are_answered_like_the_hub(double):
    ok = json.dumps({"name": "m", "organization": None}).encode()
    assert call(f"{double.url}/api/repos/create", "POST", ok, AUTH)[0] == 200
    status, headers = call(f"{double.url}/api/whoami-v2", headers={"Authorization": "Bearer hf_bad"})
    assert status == 401 and headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    status, headers = call(f"{double.url}/tester/m/resolve/main/missing.json", "HEAD")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"]
    assert call(f"{double.url}/tester/m/resolve/nope/.gitattributes", "HEAD")[0] == 404
    commit = b'{"key": "header", "value": {"summary": "x"}}\n{"key": "lfsFile", "value": {"path": "w.bin", ' \
             b'"algo": "sha256", "oid": "' + b"0" * 64 + b'", "size": 3}}\n'
    ndjson = {**AUTH, "Content-Type": "application/x-ndjson"}
    assert call(f"{double.url}/api/models/tester/m/commit/main", "POST", commit, ndjson)[0] == 422  # never uploaded
    assert set(double.files("tester/m")) == {".gitattributes"}
    double.rejected.clear()  # the 422 is the double's own refusal
