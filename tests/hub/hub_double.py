"""A protocol double of the Hugging Face Hub for tests: the HTTP endpoints huggingface_hub (2.x, without Xet) calls
to create a repository, commit files to it and read them back, on 127.0.0.1 only.

It is not a Hub. It knows one user and one token, model repositories, branches, the basic LFS transfer and file
and folder deletions in a commit (``bakeedit push`` deletes what the folder lacks); no pull requests, no multipart
uploads and no Xet: it answers Xet's token endpoint 404, as a server without Xet does. It is strict on purpose: a
request it does not understand (an unknown endpoint, query parameter, JSON key or NDJSON line) is answered 400 and
recorded in ``rejected`` (``strict_http.py``), and every test asserts ``rejected == []``, so a change in the
client's protocol fails a test instead of passing silently. Bodies follow what ``huggingface_hub/_commit_api.py``
and ``lfs.py`` send:

* ``POST /api/repos/create`` {name, organization, visibility?, type?} -> {url}; 409 {error, url} if it exists.
* ``POST /api/validate-yaml`` {content, repoType} -> {errors, warnings}; checks the card's front matter.
* ``POST /api/models/{repo}/preupload/{rev}`` {files: [{path, sample, size}]} -> upload mode per file.
* ``POST /{repo}.git/info/lfs/objects/batch`` (git-lfs batch API) -> a one-time PUT URL per missing object and a
  verify action; ``PUT`` the bytes (checked against oid and size); ``POST`` verify.
* ``POST /api/models/{repo}/commit/{rev}`` NDJSON: a header line, then file, lfsFile, deletedFile and
  deletedFolder lines (a deletion of a path the branch lacks is answered 404, as the Hub does).
* ``GET /api/models/{repo}/xet-write-token/{rev}`` -> 404: no Xet here (the client must say so, not "offline").
* ``POST /api/models/{repo}/branch/{branch}``; reads: ``GET /api/models/{repo}[/revision/{rev}]``,
  ``GET .../tree/{rev}[/path]``, ``HEAD/GET /{repo}/resolve/{rev}/{path}`` (X-Repo-Commit, ETag), whoami-v2.

Stored objects live in a temporary folder, keyed by sha256.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote

import yaml
from strict_http import PREFIX, Raw, Reject, StrictServer

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".png", ".jpg", ".zip", ".msgpack", ".h5")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
RELATIONS = {"adapter", "merge", "quantized", "finetune"}
_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
_REV = r"(?P<rev>[^/]+)"
_YAML_BLOCK = re.compile(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(\r?\n|$)")


@dataclass
class Entry:
    """A file of a commit: its content's size and sha256 (the stored object's name), and whether it is LFS."""

    size: int
    sha256: str
    lfs: bool

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    def blob_oid(self, objects: Path) -> str:
        """git's id of what the tree stores: the content, or for an LFS file its pointer."""
        data = self.pointer if self.lfs else (objects / self.sha256).read_bytes()
        return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)


def _keys(obj, allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise Reject(400, f"{PREFIX} {where} must be a JSON object")
    unknown, missing = set(obj) - allowed, required - set(obj)
    if unknown or missing:
        raise Reject(400, f"{PREFIX} {where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")


def _path(path) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or {"..", ".git"} & set(path.split("/")):
        raise Reject(400, f"{PREFIX} invalid path in repo {path!r}")
    return path


def card_errors(content: str) -> list[str]:
    """What the Hub's YAML validation would object to in a README's front matter (the parts bakeedit writes)."""
    match = _YAML_BLOCK.match(content)
    meta = yaml.safe_load(match.group(1)) if match else {}
    if not isinstance(meta, dict):
        return ["metadata is not a YAML mapping"]
    errors = [f"{key} must be a string" for key in ("license", "library_name", "pipeline_tag")
              if key in meta and not isinstance(meta[key], str)]
    if "base_model_relation" in meta and (meta["base_model_relation"] not in RELATIONS or "base_model" not in meta):
        errors.append(f"base_model_relation must be one of {sorted(RELATIONS)} and needs base_model")
    if not all(isinstance(t, str) for t in meta.get("tags", [])):
        errors.append("tags must be a list of strings")
    for entry in meta.get("model-index", []):
        for result in entry.get("results", []):
            metrics = result.get("metrics") or []
            if not (isinstance(result.get("task", {}).get("type"), str)
                    and all(isinstance(result.get("dataset", {}).get(k), str) for k in ("name", "type"))
                    and metrics and all(isinstance(m.get("type"), str) and isinstance(m.get("value"), int | float | str)
                                        for m in metrics)):
                errors.append(f"model-index result malformed: {result}")
    return errors


class HubDouble(StrictServer):
    """``with HubDouble(tmp, token) as hub:`` serves on ``hub.url`` until the block ends (or ``max_lifetime``)."""

    def __init__(self, root: Path, token: str, user: str = "tester", max_lifetime: float = 300.0):
        super().__init__(max_lifetime)
        self.objects = Path(root) / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.tickets: dict[str, tuple[str, int]] = {}  # one-time LFS upload URLs: ticket -> (oid, size)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The repository's files at ``revision`` (for assertions)."""
        repo = self.repos[repo_id]
        tree = repo.commits[repo.branches.get(revision, revision)]
        return {path: (self.objects / e.sha256).read_bytes() for path, e in tree.items()}

    # ------------------------------------------------------------------------------------------------ helpers
    def authenticate(self, headers) -> bool:
        value = headers.get("Authorization")
        if value is not None and value != f"Bearer {self.token}":  # the Hub refuses a bad token on every route
            raise Reject(401, "Invalid credentials in Authorization header")
        return value is not None

    @staticmethod
    def _require(authed: bool) -> None:
        if not authed:
            raise Reject(401, "Unauthorized: a token is required")

    def _repo(self, repo_id: str, authed: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authed):
            raise Reject(401, "Repository not found", "RepoNotFound")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> str:
        revision = unquote(revision)
        oid = repo.branches.get(revision) or (revision if revision in repo.commits else None)
        if oid is None:
            raise Reject(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    def _store(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (self.objects / digest).write_bytes(data)
        return digest

    def _new_commit(self, repo: Repo, branch: str, tree: dict[str, Entry], summary: str) -> str:
        oid = hashlib.sha1(f"{repo.repo_id}{branch}{summary}{len(repo.commits)}{sorted(tree)}".encode()).hexdigest()
        repo.commits[oid] = tree
        repo.branches[branch] = oid
        return oid

    # ------------------------------------------------------------------------------------------------ writes
    def whoami(self, req, authed):
        self._require(authed)
        return {"type": "user", "id": "0" * 24, "name": self.user, "fullname": "Test User", "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "double", "role": "write"}}}

    def agent_harnesses(self, req, authed):  # the client's agent detection (not called with telemetry off)
        return {"standardEnvVars": [], "harnesses": {}}

    def create_repo(self, req, authed):
        self._require(authed)
        body = req.json()
        _keys(body, {"name", "organization", "visibility", "type"}, {"name"}, "repos/create body")
        if body.get("type", "model") != "model" or body.get("visibility", "public") not in ("public", "private"):
            raise Reject(400, f"{PREFIX} only public or private model repositories")
        namespace = body.get("organization") or self.user
        if namespace != self.user:
            raise Reject(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        repo_id = f"{namespace}/{body['name']}"
        if repo_id in self.repos:  # the client reads the url from this answer
            raise Reject(409, "You already created this model repo", payload={
                "error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        repo = self.repos[repo_id] = Repo(repo_id, private=body.get("visibility") == "private")
        initial = {".gitattributes": Entry(len(GITATTRIBUTES), self._store(GITATTRIBUTES), False)}
        self._new_commit(repo, "main", initial, "initial commit")
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def validate_yaml(self, req, authed):
        body = req.json()
        _keys(body, {"content", "repoType"}, {"content", "repoType"}, "validate-yaml body")
        errors = card_errors(body["content"])
        if errors:
            raise Reject(400, "; ".join(errors), payload={"errors": [{"message": e} for e in errors], "warnings": []})
        return {"errors": [], "warnings": []}

    def create_branch(self, req, authed, repo, branch):
        self._require(authed)
        repo_ = self._repo(repo, True)
        body = req.json()
        _keys(body, {"startingPoint"}, set(), "branch body")
        if unquote(branch) in repo_.branches:
            raise Reject(409, "Reference already exists")
        repo_.branches[unquote(branch)] = self._commit_of(repo_, body.get("startingPoint", "main"))
        return {}

    def preupload(self, req, authed, repo, rev):
        self._require(authed)
        repo_ = self._repo(repo, True)
        tree = repo_.commits[self._commit_of(repo_, rev)]
        body = req.json()
        _keys(body, {"files", "gitIgnore"}, {"files"}, "preupload body")
        out = []
        for f in body["files"]:
            _keys(f, {"path", "sample", "size"}, {"path", "sample", "size"}, "preupload file")
            path, sample = _path(f["path"]), base64.b64decode(f["sample"])
            lfs = path.endswith(LFS_SUFFIXES) or f["size"] > 10 << 20 or b"\0" in sample
            old = tree.get(path)
            oid = None if old is None else old.sha256 if old.lfs else old.blob_oid(self.objects)
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return {"files": out, "commitOid": repo_.branches.get(unquote(rev))}

    def lfs_batch(self, req, authed, repo):
        self._require(authed)
        self._repo(repo, True)
        if "application/vnd.git-lfs+json" not in req.headers.get("Accept", ""):
            raise Reject(400, f"{PREFIX} LFS batch needs Accept: application/vnd.git-lfs+json")
        body = req.json()
        _keys(body, {"operation", "transfers", "objects", "hash_algo", "ref"}, {"operation", "objects"}, "batch")
        if (body["operation"], body.get("hash_algo", "sha256")) != ("upload", "sha256") or \
                "basic" not in body.get("transfers", ["basic"]):
            raise Reject(400, f"{PREFIX} only basic sha256 uploads")
        objects = []
        for obj in body["objects"]:
            _keys(obj, {"oid", "size"}, {"oid", "size"}, "batch object")
            if not re.fullmatch(r"[0-9a-f]{64}", obj["oid"]) or not isinstance(obj["size"], int):
                raise Reject(400, f"{PREFIX} malformed LFS object {obj}")
            if (self.objects / obj["oid"]).is_file():  # already stored: no actions, the client skips it
                objects.append({"oid": obj["oid"], "size": obj["size"]})
                continue
            ticket = secrets.token_hex(16)
            self.tickets[ticket] = (obj["oid"], obj["size"])
            objects.append({"oid": obj["oid"], "size": obj["size"], "authenticated": True, "actions": {
                "upload": {"href": f"{self.url}/__double/lfs/{ticket}", "header": {}},
                "verify": {"href": f"{self.url}/__double/lfs-verify/{repo}", "header": {}}}})
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, req, authed, ticket):  # a presigned URL: no token, the ticket is the authorisation
        if ticket not in self.tickets:
            raise Reject(403, f"{PREFIX} unknown or used upload URL")
        oid, size = self.tickets.pop(ticket)
        data = req.body()
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise Reject(400, f"{PREFIX} uploaded bytes do not match oid {oid[:12]} / size {size}")
        self._store(data)
        return {}

    def lfs_verify(self, req, authed, repo):
        self._require(authed)
        body = req.json()
        _keys(body, {"oid", "size"}, {"oid", "size"}, "LFS verify body")
        path = self.objects / body["oid"]
        if not path.is_file() or path.stat().st_size != body["size"]:
            raise Reject(404, f"{PREFIX} object was not uploaded")
        return {}

    def commit(self, req, authed, repo, rev):
        self._require(authed)
        if req.headers.get("Content-Type") != "application/x-ndjson":
            raise Reject(400, f"{PREFIX} a commit is NDJSON")
        repo_, branch = self._repo(repo, True), unquote(rev)
        if branch not in repo_.branches:
            raise Reject(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in req.body().decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise Reject(400, f"{PREFIX} the first NDJSON line must be the header")
        header = lines[0]["value"]
        _keys(header, {"summary", "description", "parentCommit"}, {"summary"}, "commit header")
        if header.get("parentCommit") not in (None, repo_.branches[branch]):
            raise Reject(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo_.commits[repo_.branches[branch]])
        for line in lines[1:]:
            _keys(line, {"key", "value"}, {"key", "value"}, "NDJSON line")
            key, value = line["key"], line["value"]
            if key == "file":
                _keys(value, {"content", "path", "encoding"}, {"content", "path", "encoding"}, "file")
                if value["encoding"] != "base64":
                    raise Reject(400, f"{PREFIX} file content must be base64")
                data = base64.b64decode(value["content"])
                tree[_path(value["path"])] = Entry(len(data), self._store(data), False)
            elif key == "lfsFile":
                _keys(value, {"path", "algo", "oid", "size"}, {"path", "algo", "oid"}, "lfsFile")
                stored = self.objects / value["oid"]
                size = stored.stat().st_size if stored.is_file() else -1
                if value["algo"] != "sha256" or size < 0 or value.get("size", size) != size:
                    raise Reject(422, f"{PREFIX} LFS object {value['oid'][:12]} was not uploaded")
                tree[_path(value["path"])] = Entry(size, value["oid"], True)
            elif key in ("deletedFile", "deletedFolder"):
                _keys(value, {"path"}, {"path"}, key)
                self._delete(tree, _path(value["path"]), folder=key == "deletedFolder")
            else:
                raise Reject(400, f"{PREFIX} unsupported NDJSON key {key!r}")
        oid = self._new_commit(repo_, branch, tree, header["summary"])
        return {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}",
                "commitMessage": header["summary"], "hookOutput": "", "pullRequestUrl": None}

    @staticmethod
    def _delete(tree: dict[str, Entry], path: str, folder: bool) -> None:
        """Remove ``path`` (or every file under it) from the commit's tree; absent paths are an error."""
        if folder:
            doomed = [name for name in tree if name.startswith(path.rstrip("/") + "/")]
        else:
            doomed = [path] if path in tree else []
        if not doomed:
            raise Reject(404, f"Entry not found: {path}", "EntryNotFound")  # the Hub's answer, not a rejection
        for name in doomed:
            del tree[name]

    def xet_token(self, req, authed, repo, rev):
        raise Reject(404, "Not Found")  # a server without Xet; not a protocol rejection

    # ------------------------------------------------------------------------------------------------ reads
    def model_info(self, req, authed, repo, rev="main"):
        repo_ = self._repo(repo, authed)
        commit = self._commit_of(repo_, rev)
        tree = repo_.commits[commit]
        card = {}
        if "README.md" in tree:
            match = _YAML_BLOCK.match((self.objects / tree["README.md"].sha256).read_text())
            card = (yaml.safe_load(match.group(1)) if match else None) or {}
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return {"_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
                "author": repo.split("/")[0], "sha": commit, "lastModified": now, "createdAt": now,
                "private": repo_.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": card.get("tags", []), "library_name": card.get("library_name"), "cardData": card,
                "siblings": [{"rfilename": p} for p in sorted(tree)]}

    def tree(self, req, authed, repo, rev, path=""):
        repo_ = self._repo(repo, authed)
        tree = repo_.commits[self._commit_of(repo_, rev)]
        recursive = req.query.get("recursive", ["false"])[0] == "true"
        prefix = path.strip("/") + "/" if path else ""
        files, dirs = [], set()
        for name in (n for n in sorted(tree) if n.startswith(prefix)):
            parts = name[len(prefix):].split("/")
            dirs.update(prefix + "/".join(parts[:depth]) for depth in range(1, len(parts)) if recursive or depth == 1)
            if recursive or len(parts) == 1:
                e = tree[name]
                files.append({"type": "file", "oid": e.blob_oid(self.objects), "size": e.size, "path": name,
                              **({"lfs": {"oid": e.sha256, "size": e.size, "pointerSize": len(e.pointer)}}
                                 if e.lfs else {})})
        if path and not files and not dirs:
            raise Reject(404, f"Entry not found: {path}", "EntryNotFound")  # the Hub's answer, not a rejection
        return [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                for d in sorted(dirs)] + files

    def resolve(self, req, authed, repo, rev, path):
        repo_ = self._repo(repo, authed)
        commit = self._commit_of(repo_, rev)
        entry = repo_.commits[commit].get(unquote(path))
        if entry is None:
            raise Reject(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit})
        if "Range" in req.headers:
            raise Reject(400, f"{PREFIX} Range requests are not supported")
        etag = entry.sha256 if entry.lfs else entry.blob_oid(self.objects)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
        if entry.lfs:
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        return Raw((self.objects / entry.sha256).read_bytes(), headers)

    ROUTES: ClassVar[list[tuple[str, str, str]]] = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", r"/api/agent-harnesses", "agent_harnesses"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", "preupload"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/__double/lfs/(?P<ticket>[0-9a-f]{32})", "lfs_put"),
        ("POST", rf"/__double/lfs-verify/{_REPO}", "lfs_verify"),
        ("POST", rf"/api/models/{_REPO}/commit/{_REV}", "commit"),
        ("GET", rf"/api/models/{_REPO}/xet-write-token/{_REV}", "xet_token"),
        ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", "model_info"),
        ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?", "tree"),
        ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve"),
    ]
    QUERY: ClassVar[dict[str, set[str]]] = {
        "model_info": {"blobs", "securityStatus"}, "tree": {"recursive", "expand", "cursor"},
    }
