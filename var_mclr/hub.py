"""Hub names for files: `hf://OWNER/REPO/FILE` (optionally `hf://OWNER/REPO@REVISION/FILE`) is accepted wherever a
checkpoint, tokenizer or evaluation file path is, and resolves through huggingface_hub and its local cache.

With a network the file is downloaded once into the cache ($HF_HOME, or HF_HUB_CACHE); without one, or with
HF_HUB_OFFLINE=1, the cached copy is used and a file that is not cached is a one-line error. Plain paths pass through
unchanged. The official VAR files live in the `FoundationVision/var` repository: hf://FoundationVision/var/var_d16.pth
and hf://FoundationVision/var/vae_ch160v4096z32.pth.
"""
from __future__ import annotations

import os

from var_mclr.errors import UserError

HUB_PREFIX = "hf://"


class HubError(UserError, ValueError):
    pass


def is_hub_name(spec: str | os.PathLike | None) -> bool:
    return spec is not None and str(spec).startswith(HUB_PREFIX)


def parse_hub_name(spec: str) -> tuple[str, str, str | None]:
    """(repo_id, filename, revision) of hf://OWNER/REPO[@REVISION]/FILE."""
    parts = spec[len(HUB_PREFIX):].split("/")
    if len(parts) < 3 or not all(parts):
        raise HubError(f"{spec}: a hub name is hf://OWNER/REPO/FILE, e.g. hf://FoundationVision/var/var_d16.pth")
    repo, revision = (parts[1].split("@", 1) + [None])[:2]
    return f"{parts[0]}/{repo}", "/".join(parts[2:]), revision


def local_path(spec: str | os.PathLike) -> str:
    """A local path for spec: itself, or the cached copy of a hub name (downloaded when the hub can be reached)."""
    if not is_hub_name(spec):
        return str(spec)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo_id, filename, revision = parse_hub_name(str(spec))
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except LocalEntryNotFoundError as e:
        raise HubError(f"{spec} is not in the local hub cache and the hub cannot be reached (offline or "
                       f"HF_HUB_OFFLINE=1): fetch it once with a network, or pass a local path ({_first_line(e)})"
                       ) from e
    except EntryNotFoundError as e:
        raise HubError(f"{spec}: the repository {repo_id} has no file {filename}") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise HubError(f"{spec} could not be fetched: {_first_line(e)}") from e


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
