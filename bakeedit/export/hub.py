"""Publish a baked folder (or a peft adapter or baked GGUF folder of ``bakeedit export``) to the Hugging Face Hub:
check it, then ``create_repo`` + ``upload_folder``.

What is published is exactly what was verified. Nothing is sent before the folder has passed every local check
(``provenance.check_folder``): it was written by ``bakeedit apply`` and passed its verification, every file is
listed in ``bakeedit.json`` with its sha256 (a tampered, truncated, added or deleted file is refused here, not
discovered by a user), the record's own digest matches and its plan matches its recipe; no pickle (``.bin``,
``.pt``, ``.pth``, ``.pkl``, ``.pickle``, ``.ckpt``) and no Python file other than the hashed custom module is
sent; and no file to upload contains the token. ``--dry-run`` runs the same checks (:func:`check_push`). The
commit deletes every file of the branch the folder lacks (``delete_patterns``), so a re-push of a re-sharded model
cannot leave old unedited shards online. The token is never taken on the command line: huggingface_hub finds it in
its usual places (``HF_TOKEN``, then the file ``hf auth login`` writes under ``HF_HOME``), and it appears in no
output, log, card or ``bakeedit.json``; error messages from the server are passed through with the token
redacted, as one line that says whether anything was pushed. After the commit, the repository's tree at the new
commit is listed and compared with the local files (size, and sha256 for LFS files), so "pushed" means the Hub
holds these bytes.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from bakeedit.errors import BakeeditError, VerificationError
from bakeedit.export.artefacts import CHECKPOINT, check_published
from bakeedit.export.card import CARD_FILE, build_card, write_card
from bakeedit.export.provenance import PROVENANCE_FILE, folder_files, read_provenance
from bakeedit.io.hashing import file_sha256

#: Never uploaded: hidden files and folders (``.git``, ``.cache``, temporary files of an interrupted write).
IGNORE_PATTERNS = [".*", "*/.*"]
#: Remote files deleted in the push's commit unless the folder holds them (then they are overwritten): the new
#: commit holds exactly the folder (huggingface_hub always keeps ``.gitattributes``; history keeps the rest).
DELETE_PATTERNS = ["*"]
#: Formats that unpickle, i.e. can run code, when loaded: never published.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: Files small and textual enough to scan for a leaked token before upload.
TEXT_SUFFIXES = (".md", ".json", ".yaml", ".yml", ".txt", ".py", ".jinja")
_MAX_SCAN_BYTES = 32 << 20
#: How the Xet client reports a server that has no Xet token endpoint (an older or Hub-compatible server).
_XET_TOKEN_ROUTE = re.compile(r"xet-(?:write|read)-token", re.IGNORECASE)
_CLIENT_ERROR = re.compile(r"\b(?:400|404|405|501)\b")

Reporter = Callable[[str], None]


class PushError(BakeeditError):
    """The folder cannot be pushed, or the Hub refused or failed the push (nothing is claimed as pushed)."""


@dataclass(frozen=True)
class UploadFile:
    path: str  # relative, POSIX
    size: int


@dataclass
class UploadPlan:
    """What ``upload_folder`` will send, after the local checks passed."""

    folder: Path
    files: list[UploadFile]
    regenerate_card: bool  # the card is rewritten with the repo id at push time (and recorded in bakeedit.json)
    sha256: dict[str, str] = field(default_factory=dict)  # checked just now against bakeedit.json
    commit_message: str = ""  # the default commit summary: the recipe's name, method and neurons, or the artefact

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    endpoint: str
    plan: UploadPlan
    checked: list[str] = field(default_factory=list)  # files whose remote size / sha256 were compared
    stale: list[str] = field(default_factory=list)  # files the commit still holds that the folder lacks (none)


def _listed(folder: Path) -> list[UploadFile]:
    """What ``upload_folder`` sends: every file of the manifest (no hidden entry) and ``bakeedit.json``."""
    names = [*folder_files(folder), PROVENANCE_FILE]
    return sorted((UploadFile(name, (folder / name).stat().st_size) for name in names), key=lambda f: f.path)


def _refuse_unsafe_files(folder: Path, files: list[UploadFile], allowed_code: set[str]) -> None:
    """A pickle can run code when it is loaded, and a Python file asks its users to trust it: the only code a
    bakeedit repository carries is its own hashed custom module (``custom_module.module_file``)."""
    for f in files:
        suffix = PurePosixPath(f.path).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise PushError(f"{folder / f.path}: a pickle file ({suffix}), which can run code when loaded; refusing "
                            "to publish it", hint="bakeedit publishes safetensors only: bake from a safetensors base")
        if suffix == ".py" and f.path not in allowed_code:
            raise PushError(f"{folder / f.path}: Python code that is not bakeedit's hashed custom module; refusing "
                            "to publish it", hint="the base model's own code was carried into the folder; bakeedit "
                            "does not publish code it did not write")


def plan_push(folder: Path) -> UploadPlan:
    """Check ``folder`` and list what would be uploaded; sends nothing. Raises before any request if the folder is
    not a verified bakeedit output exactly as its manifest records it (a baked checkpoint: ``manifest.check_folder``,
    every file, the record's digest, the plan against the recipe; a peft adapter or a baked GGUF folder: every
    file and the digest of its own record, ``export/artefacts.py``), or holds a pickle or code bakeedit did not
    write. Only a checkpoint's card is regenerated with the repo id at push time."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: no such folder")
    checked = check_published(folder, purpose="refusing to push")
    if checked.failure is not None:
        raise VerificationError(f"{folder}: {checked.failure}; refusing to publish it", hint=checked.hint)
    files = _listed(folder)
    _refuse_unsafe_files(folder, files, checked.allowed_code)
    return UploadPlan(folder, files, checked.kind == CHECKPOINT, checked.files_sha256, checked.commit_message)


def _replanned(plan: UploadPlan) -> UploadPlan:
    """The plan after the card was regenerated (and recorded): the folder must still hold exactly the manifest."""
    provenance = read_provenance(plan.folder)
    files = _listed(plan.folder)
    if {f.path for f in files} != {*provenance.files_sha256, PROVENANCE_FILE}:
        raise PushError(f"{plan.folder}: files were added or removed while pushing; nothing was pushed",
                        hint="leave the folder alone during a push, then run the same command again")
    return UploadPlan(plan.folder, files, plan.regenerate_card, dict(provenance.files_sha256), plan.commit_message)


def _check_no_token(plan: UploadPlan, token: str) -> None:
    for f in plan.files:
        path = plan.folder / f.path
        scannable = path.suffix in TEXT_SUFFIXES and path.is_file() and f.size <= _MAX_SCAN_BYTES
        if scannable and token.encode() in path.read_bytes():
            raise PushError(
                f"{path}: this file contains your Hugging Face token; refusing to upload it",
                hint="remove the token from the file (and the recipe it came from), then revoke and replace it",
            )


def check_push(folder: Path, repo_id: str) -> tuple[UploadPlan, list[str]]:
    """``push --dry-run``: every check :func:`push_folder` makes before it sends anything (repository id, the
    folder, pickles and code, and, when a token is found, that no file nor the card it would regenerate holds
    it). Returns the plan, and notes on what only the real push can find out (offline, not logged in)."""
    from huggingface_hub import constants, get_token

    check_repo_id(repo_id)
    plan = plan_push(folder)
    notes = []
    token = get_token()
    if token is None:
        notes.append("not logged in: the push needs a token (HF_TOKEN, or `hf auth login`)")
    else:
        _check_no_token(plan, token)
        card = str(build_card(plan.folder, repo_id=repo_id, heatmap=False)) if plan.regenerate_card else ""
        if token in card:  # the card the push would write
            raise PushError(f"{plan.folder / CARD_FILE}: the card regenerated for the push would contain your Hugging "
                            "Face token; refusing to upload it", hint="remove the token from the recipe, then "
                            "revoke and replace it")
    if constants.is_offline_mode():
        notes.append("HF_HUB_OFFLINE is set: the push needs the Hub")
    return plan, notes


def redact(text: str, token: str | None) -> str:
    """``text`` with every occurrence of ``token`` replaced (server messages may echo request data)."""
    return text.replace(token, "<token>") if token else text


def _first_line(exc: BaseException, token: str | None) -> str:
    text = str(exc).strip()
    return redact(text.splitlines()[0] if text else type(exc).__name__, token)


def _http_error(exc: Exception, step: str, repo_id: str, endpoint: str, token: str | None,
                committed: str | None = None) -> PushError:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    detail = _first_line(exc, token)
    if committed is not None:  # the upload succeeded; only the check after it failed
        return PushError(f"commit {committed} was made on '{repo_id}', but checking it failed (HTTP {status}): "
                         f"{detail}", hint="compare the repository with the folder, or push again to re-check it")
    if status == 401:
        return PushError(
            f"the Hub at {endpoint} rejected the token during {step} (HTTP 401): {detail}; nothing was pushed",
            hint="log in again (`hf auth login`) or set HF_TOKEN to a token with write access",
        )
    if status == 403:
        return PushError(f"no write access to '{repo_id}' at {endpoint} (HTTP 403): {detail}; nothing was pushed",
                         hint="push to your own namespace or ask for write access")
    if status is not None and status >= 500:
        return PushError(
            f"the Hub at {endpoint} failed during {step} (HTTP {status}): no commit was made; nothing was pushed to "
            f"'{repo_id}'",
            hint="usually temporary: run the same command again (files the Hub already received are not re-sent)",
        )
    return PushError(f"{step} failed for '{repo_id}' at {endpoint} ({detail}); nothing was pushed",
                     hint="check the repository id and the server, then run the same command again")


def _lacks_xet(exc: BaseException) -> bool:
    """Whether the Xet client failed because the server has no Xet token endpoint (answered 4xx/501 there)."""
    text = str(exc)
    return bool(_XET_TOKEN_ROUTE.search(text) and _CLIENT_ERROR.search(text))


def _upload_error(exc: BaseException, step: str, repo_id: str, endpoint: str, token: str | None,
                  committed: str | None) -> PushError:
    """One line for what huggingface_hub raises when an upload fails below the HTTP status level: its
    ``RuntimeError("Error while uploading 'x' to the Hub.")`` (the cause: an HTTP error or a dropped
    connection), the Xet client's errors, and connection errors. The line says whether anything was pushed."""
    from huggingface_hub.errors import HfHubHTTPError

    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if committed is not None:
        return PushError(f"commit {committed} was made on '{repo_id}', but {step} failed ({type(cause).__name__}: "
                         f"{_first_line(cause, token)})", hint="check the network, then push again to re-check it")
    if _lacks_xet(exc):
        return PushError(f"the server at {endpoint} does not support Xet uploads ({_first_line(exc, token)}); "
                         f"nothing was pushed to '{repo_id}'",
                         hint="set HF_HUB_DISABLE_XET=1 to upload through git LFS, then run the same command again")
    if str(exc).startswith("Error while uploading"):
        status = getattr(getattr(cause, "response", None), "status_code", None) if isinstance(
            cause, HfHubHTTPError) else None
        why = f"HTTP {status}" if status is not None else f"{type(cause).__name__}: {_first_line(cause, token)}"
        return PushError(f"{_first_line(exc, token).rstrip('.')} ({why}): no commit was made; nothing was pushed",
                         hint="run the same command again (files the Hub already received are not re-sent)")
    if isinstance(exc, (*_transport_errors(), ConnectionError, TimeoutError)):
        return PushError(f"could not reach the Hub at {endpoint} during {step} ({type(exc).__name__}: "
                         f"{_first_line(exc, token)}); nothing was pushed", hint="check the network or HF_ENDPOINT")
    return PushError(f"{step} failed for '{repo_id}' at {endpoint} ({type(exc).__name__}: "
                     f"{_first_line(exc, token)}); nothing was pushed", hint="run the same command again")


def _verify_remote(api, repo_id: str, commit: str, plan: UploadPlan, token: str) -> tuple[list[str], list[str]]:
    """Compare the repository tree at ``commit`` with the local files: sizes, and sha256 of LFS files. Returns the
    files compared and the files the commit holds but the folder does not (none: the commit deletes them; listed
    in case a server ignored the deletions)."""
    from huggingface_hub.hf_api import RepoFile


    remote = {
        entry.path: entry
        for entry in api.list_repo_tree(repo_id, revision=commit, recursive=True, token=token)
        if isinstance(entry, RepoFile)
    }
    wrong = []
    for f in plan.files:
        entry = remote.get(f.path)
        path = plan.folder / f.path
        lfs_differs = entry is not None and entry.lfs is not None and entry.lfs.sha256 != (
            plan.sha256.get(f.path) or file_sha256(path))  # recorded shards were hashed by plan_push already
        if entry is None or entry.size != path.stat().st_size or lfs_differs:
            wrong.append(f.path)
    if wrong:
        raise PushError(f"commit {commit} on '{repo_id}' does not hold the local bytes of: {', '.join(wrong)}",
                        hint="push again; if it persists, the server is not storing uploads faithfully")
    local = {f.path for f in plan.files} | {".gitattributes"}
    return sorted(remote), sorted(p for p in remote if p not in local)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x, requests
    before); HTTP status errors are raised as HfHubHTTPError and handled before these."""
    found = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def check_repo_id(repo_id: str, what: str = "") -> None:
    """Refuse a malformed repository id with huggingface_hub's own rule (``what`` prefixes the message, e.g. the
    option that gave it), before any request or, for ``apply --push``, before any work."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"{what}'{repo_id}' is not a valid repository id ({exc})",
                        hint="use 'namespace/name'") from None


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    report: Reporter = lambda _step: None,
) -> PushResult:
    """Check ``folder`` (see :func:`plan_push`), then create ``repo_id`` if needed, regenerate the card with the
    repo id (recorded in ``bakeedit.json``), and upload the folder in one commit to ``revision`` (a branch,
    created from main if missing; default main) that also deletes every file of the branch the folder lacks.
    Raises :class:`PushError` (never claiming success) on any refusal or failure; the token never appears in its
    message."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    check_repo_id(repo_id)
    plan = plan_push(Path(folder))
    api = HfApi(endpoint=endpoint)
    endpoint = api.endpoint
    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set: pushing needs the Hub", hint="unset HF_HUB_OFFLINE to push")
    token = get_token()
    if token is None:
        raise PushError("not logged in to the Hugging Face Hub",
                        hint="run `hf auth login` or set HF_TOKEN (a token with write access); never pass it on "
                             "the command line")
    _check_no_token(plan, token)
    step, info = "the token check", None
    try:
        report("checking the token")
        api.whoami(token=token)
        step = "creating the repository"
        report(f"creating {repo_id} (if needed)")
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        repo_id = repo_url.repo_id
        if revision is not None and revision != constants.DEFAULT_REVISION:
            step = f"creating branch '{revision}'"
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        if plan.regenerate_card:  # a checkpoint's card names the repo; adapter and GGUF cards need not
            write_card(plan.folder, repo_id=repo_id, check=False)  # plan_push checked every file just now
            plan = _replanned(plan)  # the card's final size and hash, recorded in bakeedit.json
            _check_no_token(plan, token)
        step = "the upload"
        report(f"uploading {len(plan.files)} files ({plan.total_bytes / 1e6:.1f} MB)")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=plan.folder, repo_type="model", revision=revision,
            commit_message=commit_message or plan.commit_message, ignore_patterns=list(IGNORE_PATTERNS),
            delete_patterns=list(DELETE_PATTERNS), token=token,
        )
        step = "checking the pushed files"
        report("checking the pushed files")
        checked, stale = _verify_remote(api, repo_id, info.oid, plan, token)
    except BakeeditError:
        raise
    except OfflineModeIsEnabled:
        raise PushError("HF_HUB_OFFLINE is set: pushing needs the Hub", hint="unset HF_HUB_OFFLINE") from None
    except HfHubHTTPError as exc:
        raise _http_error(exc, step, repo_id, endpoint, token, info.oid if info is not None else None) from None
    except (*_transport_errors(), ConnectionError, TimeoutError, RuntimeError) as exc:
        raise _upload_error(exc, step, repo_id, endpoint, token, info.oid if info is not None else None) from None
    return PushResult(repo_id=repo_id, revision=revision or constants.DEFAULT_REVISION, commit_oid=info.oid,
                      commit_url=info.commit_url, endpoint=endpoint, plan=plan, checked=checked, stale=stale)
