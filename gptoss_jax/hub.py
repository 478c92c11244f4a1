"""Hugging Face hub access shared by checkpoints and datasets: the hub cache and HF_HUB_OFFLINE are honoured."""

from __future__ import annotations

import re
from pathlib import Path

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_repo_id(text: str) -> bool:
    """'owner/name', not a path that happens to be missing."""
    return bool(_REPO_ID.fullmatch(text)) and not text.endswith((".json", ".jsonl", ".parquet", ".safetensors"))


def snapshot(repo_id: str, *, allow_patterns: list[str], repo_type: str = "model",
             revision: str | None = None) -> Path:
    """The local folder of a repo snapshot holding the files that match `allow_patterns`, downloaded if
    needed. Raises OSError naming the repo and why (offline and not cached, no such repo, no network)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as error:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        reason = str(error).splitlines()[0] if str(error) else ""
        raise OSError(f"{repo_id}: cannot get the {repo_type} from the Hugging Face hub or its local cache{offline}: "
                      f"{type(error).__name__}: {reason}") from None
