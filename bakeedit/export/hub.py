"""Publish a baked folder to the Hugging Face Hub: check it, then ``create_repo`` + ``upload_folder``.

Nothing is sent before the folder has passed every local check: it was written by ``bakeedit apply`` and passed its
verification, every file recorded in ``bakeedit.json`` still has its sha256 (a tampered or truncated shard is refused
here, not discovered by a user), and no file to upload contains the token. The token is never taken on the command
line: huggingface_hub finds it in its usual places (``HF_TOKEN``, then the file ``hf auth login`` writes under
``HF_HOME``), and it appears in no output, log, card or ``bakeedit.json``; error messages from the server are
passed through with the token redacted. After the commit, the repository's tree at the new commit is listed and
compared with the local files (size, and sha256 for LFS files), so "pushed" means the Hub holds these bytes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bakeedit.errors import BakeeditError, VerificationError
from bakeedit.export.card import CARD_FILE, is_generated_card, write_card
from bakeedit.export.provenance import check_file_hashes, read_provenance

#: Never uploaded: hidden files and folders (``.git``, ``.cache``, temporary files of an interrupted write).
IGNORE_PATTERNS = [".*", "*/.*"]
#: Files small and textual enough to scan for a leaked token before upload.
TEXT_SUFFIXES = (".md", ".json", ".yaml", ".yml", ".txt", ".py", ".jinja")
_MAX_SCAN_BYTES = 32 << 20

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
    regenerate_card: bool  # README.md is missing or a generated card: it is (re)written with the repo id
    sha256: dict[str, str] = field(default_factory=dict)  # checked just now against bakeedit.json

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def relisted(self) -> UploadPlan:
        """The same plan with the folder listed again (after the card was written; nothing is re-hashed)."""
        return UploadPlan(self.folder, _listed(self.folder), self.regenerate_card, self.sha256)


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    endpoint: str
    plan: UploadPlan
    checked: list[str] = field(default_factory=list)  # files whose remote size / sha256 were compared
    stale: list[str] = field(default_factory=list)  # weight/code files in the repository that the folder lacks


def _listed(folder: Path) -> list[UploadFile]:
    from huggingface_hub.utils import filter_repo_objects

    relative = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    kept = filter_repo_objects(relative, ignore_patterns=IGNORE_PATTERNS)
    return sorted((UploadFile(path, (folder / path).stat().st_size) for path in kept), key=lambda f: f.path)


def plan_push(folder: Path) -> UploadPlan:
    """Check ``folder`` and list what would be uploaded; sends nothing. Raises before any request if the folder is
    not a verified bakeedit output or a recorded file changed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: no such folder")
    provenance = read_provenance(folder)
    if not provenance.verification.passed:
        raise VerificationError(
            f"{folder}: its verification failed (max |delta logit| {provenance.verification.max_abs_logit_delta:.3g}"
            f" > {provenance.verification.tolerance:.3g}); refusing to publish it",
            hint="re-run bakeedit apply; only verified checkpoints are pushed",
        )
    changed = check_file_hashes(folder, provenance)
    if changed:
        raise VerificationError(
            f"{folder}: refusing to push: {len(changed)} file(s) differ from the sha256 recorded in bakeedit.json "
            f"({', '.join(changed)})",
            hint="a shard was modified, truncated or replaced after bakeedit apply wrote it; re-run bakeedit apply",
        )
    card = folder / CARD_FILE
    files = _listed(folder)
    regenerate = not card.is_file() or is_generated_card(card)
    if not card.is_file():
        files.append(UploadFile(CARD_FILE, 0))  # written at push time; its size is known then
    return UploadPlan(folder, sorted(files, key=lambda f: f.path), regenerate, dict(provenance.files_sha256))


def _check_no_token(plan: UploadPlan, token: str) -> None:
    for f in plan.files:
        path = plan.folder / f.path
        scannable = path.suffix in TEXT_SUFFIXES and path.is_file() and f.size <= _MAX_SCAN_BYTES
        if scannable and token.encode() in path.read_bytes():
            raise PushError(
                f"{path}: this file contains your Hugging Face token; refusing to upload it",
                hint="remove the token from the file (and the recipe it came from), then revoke and replace it",
            )


def redact(text: str, token: str | None) -> str:
    """``text`` with every occurrence of ``token`` replaced (server messages may echo request data)."""
    return text.replace(token, "<token>") if token else text


def _http_error(exc: Exception, step: str, repo_id: str, endpoint: str, token: str | None,
                committed: str | None = None) -> PushError:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    detail = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, token)
    if committed is not None:  # the upload succeeded; only the check after it failed
        return PushError(f"commit {committed} was made on '{repo_id}', but checking it failed (HTTP {status}): "
                         f"{detail}", hint="compare the repository with the folder, or push again to re-check it")
    if status == 401:
        return PushError(
            f"the Hub at {endpoint} rejected the token during {step} (HTTP 401): {detail}",
            hint="log in again (`hf auth login`) or set HF_TOKEN to a token with write access; nothing was pushed",
        )
    if status == 403:
        return PushError(f"no write access to '{repo_id}' at {endpoint} (HTTP 403): {detail}",
                         hint="push to your own namespace or ask for write access; nothing was pushed")
    if status is not None and status >= 500:
        return PushError(
            f"the Hub at {endpoint} failed during {step} (HTTP {status}): no commit was made; nothing was pushed to "
            f"'{repo_id}'",
            hint="usually temporary: run the same command again (files the Hub already received are not re-sent)",
        )
    return PushError(f"{step} failed for '{repo_id}' at {endpoint}: {detail}", hint="nothing was pushed")


STALE_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".py")


def _verify_remote(api, repo_id: str, commit: str, plan: UploadPlan, token: str) -> tuple[list[str], list[str]]:
    """Compare the repository tree at ``commit`` with the local files: sizes, and sha256 of LFS files. Returns the
    files compared and the weight/code files the repository holds but the folder does not (left by an earlier push:
    ``upload_folder`` adds and overwrites, it does not delete)."""
    from huggingface_hub.hf_api import RepoFile

    from bakeedit.models.embedded import file_sha256

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
    local = {f.path for f in plan.files}
    return sorted(remote), sorted(p for p in remote if p.endswith(STALE_SUFFIXES) and p not in local)


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


def _commit_message(folder: Path) -> str:
    prov = read_provenance(folder)
    return (f"bakeedit: {prov.recipe.data.get('name', folder.name)} ({prov.neurons.method}, "
            f"{prov.plan.n_neurons} neurons, {prov.edit_form})")


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
    """Check ``folder`` (see :func:`plan_push`), then create ``repo_id`` if needed and upload the folder in one
    commit to ``revision`` (a branch, created from main if missing; default main). Raises :class:`PushError`
    (never claiming success) on any refusal or failure; the token never appears in its message."""
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
        if plan.regenerate_card:
            write_card(plan.folder, repo_id=repo_id)
            plan = plan.relisted()  # the card's final size (and the heat map, if it was new)
            _check_no_token(plan, token)
        step = "the upload"
        report(f"uploading {len(plan.files)} files ({plan.total_bytes / 1e6:.1f} MB)")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=plan.folder, repo_type="model", revision=revision,
            commit_message=commit_message or _commit_message(plan.folder), ignore_patterns=list(IGNORE_PATTERNS),
            token=token,
        )
        step = "checking the pushed files"
        report("checking the pushed files")
        checked, stale = _verify_remote(api, repo_id, info.oid, plan, token)
    except OfflineModeIsEnabled:
        raise PushError("HF_HUB_OFFLINE is set: pushing needs the Hub", hint="unset HF_HUB_OFFLINE") from None
    except HfHubHTTPError as exc:
        raise _http_error(exc, step, repo_id, endpoint, token, info.oid if info is not None else None) from None
    except (*_transport_errors(), ConnectionError) as exc:
        done = f"commit {info.oid} was made, but" if info is not None else "nothing was pushed;"
        raise PushError(f"could not reach the Hub at {endpoint} during {step} ({type(exc).__name__}: "
                        f"{redact(str(exc), token)})", hint=f"{done} check the network or HF_ENDPOINT") from None
    return PushResult(repo_id=repo_id, revision=revision or constants.DEFAULT_REVISION, commit_oid=info.oid,
                      commit_url=info.commit_url, endpoint=endpoint, plan=plan, checked=checked, stale=stale)
