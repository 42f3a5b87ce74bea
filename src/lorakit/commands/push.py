"""`lorakit push RUN_OR_ADAPTER --repo-id USER/NAME`: a run's adapter (or its merged model) and a model card to the
Hugging Face Hub, with huggingface_hub.

The card (README.md) is made by analysis/card.py from the run folder. The upload is one `HfApi.create_repo`
(exist_ok: pushing again updates the repository) and one `HfApi.create_commit` that adds every file of the
adapter or model folder by path and the card from memory, so nothing is written into the run folder
(`upload_folder` uploads a folder as it is on disk). The endpoint is --endpoint, else HF_ENDPOINT, else the
Hub; the token --token, else HF_TOKEN or the saved login. --dry-run writes the card and the file list instead.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from lorakit.errors import LorakitError

CARD_NAME = "README.md"
FILE_LIST = "files.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN_OR_ADAPTER, --repo-id and the upload options."""
    parser.epilog = ("examples:\n  lorakit push runs/quickstart --repo-id alice/quickstart-lora\n"
                     "  lorakit push runs/quickstart --repo-id alice/quickstart-merged --merged --private\n"
                     "  lorakit push runs/quickstart --repo-id alice/quickstart-lora --dry-run  # the card, files\n")
    parser.add_argument("source", metavar="RUN_OR_ADAPTER",
                        help="a run folder (its adapter/ or model/), an adapter folder or a fine-tuned model folder")
    parser.add_argument("--repo-id", default=None, metavar="USER/NAME", help="the Hub repository to create or update")
    parser.add_argument("--merged", action="store_true",
                        help="push the base with the adapter merged into it (lorakit merge) instead of the adapter")
    parser.add_argument("--model", default=None, help="with --merged: the base model (default: the one recorded)")
    parser.add_argument("--private", action="store_true", help="create the repository private (an existing one "
                                                               "keeps its visibility)")
    parser.add_argument("--token", default=None, help="a Hub token with write access (default: HF_TOKEN, or the token "
                                                      "saved by `hf auth login`)")
    parser.add_argument("--endpoint", default=None, metavar="URL",
                        help="the Hub's address (default: HF_ENDPOINT, else https://huggingface.co)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the card and the file list to --out instead of uploading")
    parser.add_argument("--out", default=None, help="with --dry-run: the folder for the card, the file list (and the "
                                                    "merged model, with --merged); default: hub-NAME here")


def check_repo_id(repo_id: str | None) -> str:
    """`repo_id` when it is USER/NAME; else one clear error."""
    from lorakit.analysis.card import HUB_ID

    if not repo_id:
        raise LorakitError("lorakit push needs --repo-id USER/NAME: the Hub repository to create or update")
    if not HUB_ID.match(repo_id):
        raise LorakitError(f"--repo-id {repo_id!r}: expected USER/NAME (letters, digits, '-', '_', '.'), "
                           "e.g. alice/my-lora")
    return repo_id


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(path in the repository, file) for every file under `folder`, hidden ones and an old README.md left out."""
    files = [(path.relative_to(folder).as_posix(), path) for path in sorted(folder.rglob("*")) if path.is_file()]
    return [(name, path) for name, path in files
            if name != CARD_NAME and not any(part.startswith(".") for part in name.split("/"))]


def upload(repo_id: str, files: list[tuple[str, Path]], card: str, *, endpoint: str, token: str | None,
           private: bool) -> str:
    """Create `repo_id` (or find it) at `endpoint` and commit `files` and the card; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from lorakit.models import hub_unreachable

    if constants.HF_HUB_OFFLINE:
        raise LorakitError("HF_HUB_OFFLINE is set, so huggingface_hub sends nothing: unset it to push "
                           "(or use --dry-run)")
    token = token or get_token()
    if not token:
        raise LorakitError("pushing needs a Hub token with write access: pass --token, set HF_TOKEN, or log in with "
                           "`hf auth login`")
    unreachable = hub_unreachable(endpoint)
    if unreachable:
        raise LorakitError(f"cannot push to {repo_id}: {unreachable}")
    api = HfApi(endpoint=endpoint, token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode("utf-8")))
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        info = api.create_commit(repo_id, operations,
                                 commit_message=f"lorakit push: {len(files)} files and a model card")
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        detail = (error.server_message or str(error)).strip().splitlines()[0]
        raise LorakitError(f"the hub at {endpoint} refused the push to {repo_id} (HTTP {status}): {detail}") from None
    except ValueError as error:  # the hub's check of the card's metadata (validate-yaml)
        raise LorakitError(f"the hub at {endpoint} refused the model card for {repo_id}: "
                           f"{' '.join(str(error).split())}") from None
    return str(info.commit_url)


def _listing(files: list[tuple[str, Path]]) -> str:
    return "".join(f"{name}\t{path.stat().st_size}\t{path}\n" for name, path in files)


def _empty_folder(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise LorakitError(f"--out {out} is not empty; pick a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(args: argparse.Namespace) -> int:
    """Write the card, then upload it with the adapter or merged model (or, with --dry-run, write them to --out)."""
    from lorakit.analysis.card import card_facts, model_card
    from lorakit.commands.merge import merge_to_folder
    from lorakit.permissions import share_tree

    repo_id = check_repo_id(args.repo_id)
    facts = card_facts(args.source)
    if args.merged and facts.whole_model:
        raise LorakitError(f"{facts.folder} is a whole fine-tuned model, not an adapter: push it without --merged")
    card = model_card(facts, repo_id, merged=args.merged)
    out = _empty_folder(Path(args.out or f"hub-{repo_id.split('/')[-1]}")) if args.dry_run else None
    with tempfile.TemporaryDirectory(prefix="lorakit-push-") as scratch:
        folder = facts.folder
        if args.merged:  # a dry run keeps the merged model in --out, to look at
            folder = merge_to_folder(facts.folder, (out or Path(scratch)) / "model", args.model)
        files = folder_files(folder)
        size = sum(path.stat().st_size for _, path in files) + len(card.encode("utf-8"))
        if out is not None:
            (out / CARD_NAME).write_text(card, encoding="utf-8")
            (out / FILE_LIST).write_text(_listing(files) + f"{CARD_NAME}\t{len(card.encode('utf-8'))}\t(generated)\n",
                                         encoding="utf-8")
            share_tree(out)
            print(f"dry run: nothing uploaded. {repo_id} would get {len(files) + 1} files ({size / 1e6:.2f} MB):")
            for name, _ in [*files, (CARD_NAME, None)]:
                print(f"  {name}")
            print(f"the model card and the file list are in {out}")
            return 0
        endpoint = (args.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        url = upload(repo_id, files, card, endpoint=endpoint, token=args.token, private=args.private)
    print(f"pushed {len(files) + 1} files ({size / 1e6:.2f} MB) to {endpoint}/{repo_id}: {url}")
    return 0
