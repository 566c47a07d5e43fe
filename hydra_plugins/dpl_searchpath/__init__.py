"""dpl's sweep configs on Hydra's config search path, so ``--config-name optuna_lr`` works from any
directory without a ``--config-dir``.

Hydra finds search-path plugins only in the ``hydra_plugins`` namespace, hence this package.
Plugins are global to an environment: this one adds the folder only when the app's primary
config is dpl's own (``conf/``), so other Hydra apps installed beside dpl see nothing of it.
A user's ``--config-dir`` is searched before it.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR, SWEEPS_DIR = ROOT / "conf", ROOT / "sweeps"


class DplSweepsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        ours = any(e.provider == "main" and _local(e.path) == CONF_DIR for e in search_path.get_path())
        if ours and SWEEPS_DIR.is_dir():
            search_path.append(provider="dpl-sweeps", path=f"file://{SWEEPS_DIR}")


def _local(path: str | None) -> Path | None:
    """A search-path entry as a local folder (``file://`` or a bare path), None for ``pkg://`` and the like."""
    if not path:
        return None
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        return None
    return Path(path).resolve()
