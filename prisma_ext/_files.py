"""Writing a file all at once: to a temporary name next to it, renamed onto it at the end.

    with replacing(path) as tmp:
        tmp.write_text(text)        # or save_file(tensors, str(tmp)), torch.save(obj, tmp) ...

If the block raises (a failed write, Ctrl-C), the temporary file is removed and `path` is as it
was, so a reader never sees a partial file. The file gets the permissions a plain write would
give it (those of the file it replaces, or 0o666 less the umask), not the temporary file's 0o600.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto `path` when the block ends (removed if it raises)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _mode_for(path: Path) -> int:
    """The permission bits a plain open(path, "w") would leave on `path`."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
