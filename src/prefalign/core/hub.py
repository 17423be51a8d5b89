"""Pushing a model folder to the Hugging Face Hub (`prefalign export RUN OUT --push-to-hub REPO`, and
`train.push_to_hub: REPO` at the end of a run), through `huggingface_hub.HfApi`.

The folder is what `prefalign export` writes (a `from_pretrained` folder with its model card, README.md);
the repository is created when missing (private unless `private=False`), and the folder is uploaded as one
commit. The endpoint is huggingface_hub's (`HF_ENDPOINT`), the token its own (`HF_TOKEN`, or
`huggingface-cli login`). A refused or failed push is one `error:` line naming the repository.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from prefalign.core.errors import UserError

NETWORK = {"httpx", "httpcore", "requests", "urllib3", "huggingface_hub"}  # whose errors mean "push failed"


def _library(error: Exception) -> str:
    return type(error).__module__.split(".")[0]


def push_folder(folder: str | Path, repo_id: str, *, private: bool = True, message: str | None = None) -> str:
    """Create `repo_id` (a model repository, `private` when new) and upload `folder` into it as one commit.
    Returns the commit's URL."""
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise UserError(f"push to {repo_id}: {folder} has no README.md (export the run first)")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=message or f"prefalign: upload {folder.name}"
        )
    except (
        Exception
    ) as e:  # refused, unauthorized, unreachable, a bad repo id: one line; anything else raises
        if not isinstance(e, (HfHubHTTPError, OSError, ValueError)) and _library(e) not in NETWORK:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"push to {repo_id} failed: {first}") from None
    return commit.commit_url
