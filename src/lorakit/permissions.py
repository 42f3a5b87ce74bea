"""Permissions of the files lorakit writes for people to share: the ones the user's umask asks for.

Writers that create files privately whatever the umask (safetensors' `save_file` and
`tempfile.mkstemp` make 0600 files, `tempfile.mkdtemp` 0700 folders) are followed by `share`,
which sets the mode an ordinary `open()` or `mkdir()` would have given: 0o666 & ~umask for a
file, 0o777 & ~umask for a folder. So an adapter, a merged model or a checkpoint on a shared disk
is readable by the team exactly when the user's other files are.
"""
from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """This process's umask, read without changing it where Linux tells it (/proc), so no other
    thread ever creates a file under a temporary mask."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share(*paths: Path | str) -> None:
    """Give each path the mode the umask asks for (folders 0o777 & ~umask, files 0o666 & ~umask);
    a folder's contents are not touched."""
    mask = umask()
    for path in map(Path, paths):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def share_tree(folder: Path | str) -> None:
    """`share` a folder and everything in it (e.g. a model folder that `save_pretrained` wrote)."""
    folder = Path(folder)
    share(folder, *folder.rglob("*"))
